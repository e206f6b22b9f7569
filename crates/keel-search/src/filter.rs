//! A typed filter builder: conditions are values, never text, so input from
//! users is escaped by construction and cannot change the expression.

use std::fmt::{self, Write as _};

use crate::error::{Result, SearchError};
use crate::names::check_field;

/// A value compared in a [`Filter`].
///
/// Strings are always written quoted and escaped; numbers must be finite.
#[derive(Clone, Debug, PartialEq)]
pub enum FilterValue {
    /// A string (compared case-insensitively, as Meilisearch does).
    String(String),
    /// An integer.
    Int(i64),
    /// A finite floating-point number.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl FilterValue {
    /// The value as the engine compares it (text for strings and booleans,
    /// decimal for numbers).
    pub(crate) fn text(&self) -> String {
        match self {
            FilterValue::String(s) => s.clone(),
            FilterValue::Int(i) => i.to_string(),
            FilterValue::Float(f) => f.to_string(),
            FilterValue::Bool(b) => b.to_string(),
        }
    }

    fn check(&self) -> Result<()> {
        match self {
            FilterValue::Float(f) if !f.is_finite() => Err(SearchError::invalid(
                "filter",
                "numbers in filters must be finite",
            )),
            FilterValue::String(s) if s.contains('\0') => Err(SearchError::invalid(
                "filter",
                "strings in filters must not contain NUL characters",
            )),
            _ => Ok(()),
        }
    }

    fn render(&self, out: &mut String) {
        match self {
            FilterValue::String(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
            FilterValue::Int(i) => {
                let _ = write!(out, "{i}");
            }
            FilterValue::Float(f) => {
                let _ = write!(out, "{f}");
            }
            FilterValue::Bool(b) => {
                let _ = write!(out, "{b}");
            }
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident $(as $cast:ty)?),* $(,)?) => {$(
        impl From<$t> for FilterValue {
            fn from(v: $t) -> Self {
                FilterValue::$v(v $(as $cast)?.into())
            }
        }
    )*};
}

value_from!(
    &str => String,
    String => String,
    i64 => Int,
    i32 => Int,
    u32 => Int,
    f64 => Float,
    f32 => Float,
    bool => Bool,
);

impl From<&String> for FilterValue {
    fn from(v: &String) -> Self {
        FilterValue::String(v.clone())
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Gt => ">",
            Op::Gte => ">=",
            Op::Lt => "<",
            Op::Lte => "<=",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    /// Matches everything (an empty `all`).
    True,
    Cmp(String, Op, FilterValue),
    Between(String, FilterValue, FilterValue),
    In(String, Vec<FilterValue>),
    Exists(String),
    IsNull(String),
    IsEmpty(String),
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
}

/// A filter over document attributes, built from typed conditions.
///
/// Attribute names are checked (`[A-Za-z0-9_-]`, `.` between nested
/// names) and values are quoted and escaped when the filter is rendered,
/// so a value taken from a request can never add a condition. Every
/// attribute used must be declared filterable in the index settings.
///
/// ```
/// use keel_search::Filter;
///
/// let user_input = r#"books" OR price > 0"#;
/// let filter = Filter::eq("category", user_input)
///     .and(Filter::between("price", 10, 20))
///     .and(Filter::any_of("tags", ["new", "sale"]).not());
/// assert_eq!(
///     filter.to_expression().unwrap().as_deref(),
///     Some(r#"(category = "books\" OR price > 0") AND (price 10 TO 20) AND (NOT (tags IN ["new", "sale"]))"#)
/// );
/// assert!(Filter::eq("price OR 1", 1).to_expression().is_err());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Filter(pub(crate) Node);

impl Filter {
    fn cmp(field: impl Into<String>, op: Op, value: impl Into<FilterValue>) -> Self {
        Filter(Node::Cmp(field.into(), op, value.into()))
    }

    /// `field = value` (for arrays: some element equals it).
    pub fn eq(field: impl Into<String>, value: impl Into<FilterValue>) -> Self {
        Self::cmp(field, Op::Eq, value)
    }

    /// `field != value`; also matches documents without the attribute.
    pub fn ne(field: impl Into<String>, value: impl Into<FilterValue>) -> Self {
        Self::cmp(field, Op::Ne, value)
    }

    /// `field > value` (numbers).
    pub fn gt(field: impl Into<String>, value: impl Into<Number>) -> Self {
        Self::cmp(field, Op::Gt, value.into().0)
    }

    /// `field >= value` (numbers).
    pub fn gte(field: impl Into<String>, value: impl Into<Number>) -> Self {
        Self::cmp(field, Op::Gte, value.into().0)
    }

    /// `field < value` (numbers).
    pub fn lt(field: impl Into<String>, value: impl Into<Number>) -> Self {
        Self::cmp(field, Op::Lt, value.into().0)
    }

    /// `field <= value` (numbers).
    pub fn lte(field: impl Into<String>, value: impl Into<Number>) -> Self {
        Self::cmp(field, Op::Lte, value.into().0)
    }

    /// `low <= field <= high` (numbers).
    pub fn between(
        field: impl Into<String>,
        low: impl Into<Number>,
        high: impl Into<Number>,
    ) -> Self {
        Filter(Node::Between(field.into(), low.into().0, high.into().0))
    }

    /// `field IN [values…]`: equals one of them.
    pub fn any_of<V: Into<FilterValue>>(
        field: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        Filter(Node::In(
            field.into(),
            values.into_iter().map(Into::into).collect(),
        ))
    }

    /// `field EXISTS`: the document has the attribute (even `null`).
    pub fn exists(field: impl Into<String>) -> Self {
        Filter(Node::Exists(field.into()))
    }

    /// `field IS NULL`: the attribute is present and `null`.
    pub fn is_null(field: impl Into<String>) -> Self {
        Filter(Node::IsNull(field.into()))
    }

    /// `field IS EMPTY`: the attribute is `""`, `[]` or `{}`.
    pub fn is_empty(field: impl Into<String>) -> Self {
        Filter(Node::IsEmpty(field.into()))
    }

    /// Both this and `other`.
    #[must_use]
    pub fn and(self, other: Filter) -> Self {
        match self.0 {
            Node::And(mut v) => {
                v.push(other.0);
                Filter(Node::And(v))
            }
            n => Filter(Node::And(vec![n, other.0])),
        }
    }

    /// This or `other`.
    #[must_use]
    pub fn or(self, other: Filter) -> Self {
        match self.0 {
            Node::Or(mut v) => {
                v.push(other.0);
                Filter(Node::Or(v))
            }
            n => Filter(Node::Or(vec![n, other.0])),
        }
    }

    /// The opposite of this filter.
    #[must_use]
    #[allow(clippy::should_implement_trait)] // reads as the filter's own NOT, not `!filter`
    pub fn not(self) -> Self {
        Filter(Node::Not(Box::new(self.0)))
    }

    /// Every filter in `filters` (matches everything when there are none).
    pub fn all(filters: impl IntoIterator<Item = Filter>) -> Self {
        let v: Vec<Node> = filters.into_iter().map(|f| f.0).collect();
        if v.is_empty() {
            Filter(Node::True)
        } else {
            Filter(Node::And(v))
        }
    }

    /// At least one filter in `filters`.
    ///
    /// An empty list matches nothing, which no expression can say: it is
    /// refused when rendered.
    pub fn any(filters: impl IntoIterator<Item = Filter>) -> Self {
        Filter(Node::Or(filters.into_iter().map(|f| f.0).collect()))
    }

    /// The attributes this filter reads.
    #[must_use]
    pub fn fields(&self) -> Vec<&str> {
        fn walk<'a>(n: &'a Node, out: &mut Vec<&'a str>) {
            match n {
                Node::True => {}
                Node::Cmp(f, ..)
                | Node::Between(f, ..)
                | Node::In(f, _)
                | Node::Exists(f)
                | Node::IsNull(f)
                | Node::IsEmpty(f) => out.push(f),
                Node::And(v) | Node::Or(v) => v.iter().for_each(|n| walk(n, out)),
                Node::Not(n) => walk(n, out),
            }
        }
        let mut out = Vec::new();
        walk(&self.0, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Checks attribute names and values.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidField`] for a bad attribute name,
    /// [`SearchError::InvalidArgument`] for a non-finite number, an empty
    /// `any`/`any_of`, or a negated filter that matches everything.
    pub fn validate(&self) -> Result<()> {
        fn walk(n: &Node) -> Result<()> {
            match n {
                Node::True => Ok(()),
                Node::Cmp(f, _, v) => {
                    check_field(f)?;
                    v.check()
                }
                Node::Between(f, a, b) => {
                    check_field(f)?;
                    a.check()?;
                    b.check()
                }
                Node::In(f, values) => {
                    check_field(f)?;
                    if values.is_empty() {
                        return Err(SearchError::invalid(
                            "filter",
                            format!("{f} IN needs at least one value"),
                        ));
                    }
                    values.iter().try_for_each(FilterValue::check)
                }
                Node::Exists(f) | Node::IsNull(f) | Node::IsEmpty(f) => check_field(f),
                Node::And(v) => v.iter().try_for_each(walk),
                Node::Or(v) => {
                    if v.is_empty() {
                        return Err(SearchError::invalid(
                            "filter",
                            "`any` of no filters matches nothing and cannot be expressed",
                        ));
                    }
                    v.iter().try_for_each(walk)
                }
                Node::Not(inner) => {
                    if simplify(inner).is_none() {
                        return Err(SearchError::invalid(
                            "filter",
                            "the negation of a filter that matches everything matches nothing",
                        ));
                    }
                    walk(inner)
                }
            }
        }
        walk(&self.0)
    }

    /// The filter as a Meilisearch filter expression, or `None` when it
    /// matches everything.
    ///
    /// # Errors
    ///
    /// As [`validate`](Self::validate).
    pub fn to_expression(&self) -> Result<Option<String>> {
        self.validate()?;
        let Some(node) = simplify(&self.0) else {
            return Ok(None);
        };
        let mut out = String::new();
        render(&node, &mut out);
        Ok(Some(out))
    }
}

impl fmt::Display for Filter {
    /// The expression, or `<invalid filter>` when it does not validate.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_expression() {
            Ok(Some(e)) => f.write_str(&e),
            Ok(None) => f.write_str("<everything>"),
            Err(_) => f.write_str("<invalid filter>"),
        }
    }
}

/// A number for range conditions; built from any integer or float type.
#[derive(Clone, Debug, PartialEq)]
pub struct Number(FilterValue);

macro_rules! number_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Number {
            fn from(v: $t) -> Self {
                Number(FilterValue::$v(v.into()))
            }
        }
    )*};
}
number_from!(i64 => Int, i32 => Int, u32 => Int, f64 => Float, f32 => Float);

/// Drops `True` terms; `None` means "matches everything".
pub(crate) fn simplify(n: &Node) -> Option<Node> {
    match n {
        Node::True => None,
        Node::And(v) => {
            let kept: Vec<Node> = v.iter().filter_map(simplify).collect();
            match kept.len() {
                0 => None,
                1 => kept.into_iter().next(),
                _ => Some(Node::And(kept)),
            }
        }
        Node::Or(v) => {
            let mut kept = Vec::with_capacity(v.len());
            for n in v {
                kept.push(simplify(n)?);
            }
            if kept.len() == 1 {
                kept.into_iter().next()
            } else {
                Some(Node::Or(kept))
            }
        }
        Node::Not(inner) => Some(Node::Not(Box::new(simplify(inner)?))),
        other => Some(other.clone()),
    }
}

fn render(n: &Node, out: &mut String) {
    let join = |v: &[Node], sep: &str, out: &mut String| {
        for (i, n) in v.iter().enumerate() {
            if i > 0 {
                out.push_str(sep);
            }
            out.push('(');
            render(n, out);
            out.push(')');
        }
    };
    match n {
        Node::True => {}
        Node::Cmp(f, op, v) => {
            let _ = write!(out, "{f} {} ", op.as_str());
            v.render(out);
        }
        Node::Between(f, a, b) => {
            out.push_str(f);
            out.push(' ');
            a.render(out);
            out.push_str(" TO ");
            b.render(out);
        }
        Node::In(f, values) => {
            out.push_str(f);
            out.push_str(" IN [");
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                v.render(out);
            }
            out.push(']');
        }
        Node::Exists(f) => {
            let _ = write!(out, "{f} EXISTS");
        }
        Node::IsNull(f) => {
            let _ = write!(out, "{f} IS NULL");
        }
        Node::IsEmpty(f) => {
            let _ = write!(out, "{f} IS EMPTY");
        }
        Node::And(v) => join(v, " AND ", out),
        Node::Or(v) => join(v, " OR ", out),
        Node::Not(inner) => {
            out.push_str("NOT (");
            render(inner, out);
            out.push(')');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(f: &Filter) -> String {
        f.to_expression().unwrap().unwrap()
    }

    #[test]
    fn values_are_quoted_and_escaped() {
        assert_eq!(
            expr(&Filter::eq("title", r#"a"b\c"#)),
            r#"title = "a\"b\\c""#
        );
        assert_eq!(
            expr(&Filter::eq("title", "x\") OR (y = \"1")),
            r#"title = "x\") OR (y = \"1""#
        );
        assert_eq!(expr(&Filter::gte("price", 2.5)), "price >= 2.5");
        assert_eq!(expr(&Filter::ne("stock", true)), "stock != true");
        assert_eq!(expr(&Filter::is_null("a.b")), "a.b IS NULL");
    }

    #[test]
    fn bad_fields_and_values_are_refused() {
        assert!(Filter::eq("a = 1 OR b", 1).to_expression().is_err());
        assert!(Filter::eq("", 1).to_expression().is_err());
        assert!(Filter::gt("price", f64::NAN).to_expression().is_err());
        assert!(
            Filter::any_of("t", Vec::<String>::new())
                .to_expression()
                .is_err()
        );
        assert!(Filter::any([]).to_expression().is_err());
        assert!(Filter::all([]).not().to_expression().is_err());
        assert!(Filter::eq("a", "x\0").to_expression().is_err());
    }

    #[test]
    fn empty_all_matches_everything() {
        assert_eq!(Filter::all([]).to_expression().unwrap(), None);
        assert_eq!(
            expr(&Filter::all([Filter::all([]), Filter::exists("a")])),
            "a EXISTS"
        );
        assert_eq!(
            Filter::any([Filter::all([]), Filter::exists("a")])
                .to_expression()
                .unwrap(),
            None
        );
    }

    #[test]
    fn fields_are_listed_once() {
        let f = Filter::eq("a", 1)
            .or(Filter::gt("b", 2))
            .and(Filter::eq("a", 3).not());
        assert_eq!(f.fields(), vec!["a", "b"]);
    }
}

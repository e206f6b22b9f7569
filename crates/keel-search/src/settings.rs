//! Index settings.

use std::collections::BTreeMap;

use crate::error::{Result, SearchError};
use crate::names::check_field;

/// Meilisearch's default ranking rules, in order (what the in-memory
/// engine applies, and what Meilisearch up to v1.x releases before the
/// split of `attribute` reports).
pub const DEFAULT_RANKING_RULES: [&str; 6] = [
    "words",
    "typo",
    "proximity",
    "attribute",
    "sort",
    "exactness",
];

/// The default ranking rules newer Meilisearch releases report (v1.50
/// among them), where `attribute` is split into `attributeRank` and
/// `wordPosition`. Read back, they normalize to `None` like
/// [`DEFAULT_RANKING_RULES`]: both mean "the engine's defaults".
pub const SPLIT_DEFAULT_RANKING_RULES: [&str; 7] = [
    "words",
    "typo",
    "proximity",
    "attributeRank",
    "sort",
    "wordPosition",
    "exactness",
];

/// Every built-in ranking rule name a setting may use (besides
/// `field:asc` / `field:desc`).
pub const BUILT_IN_RANKING_RULES: [&str; 8] = [
    "words",
    "typo",
    "proximity",
    "attribute",
    "attributeRank",
    "wordPosition",
    "sort",
    "exactness",
];

/// How an index searches, filters and sorts.
///
/// Applying settings replaces all of them: an attribute left out of
/// `filterable_attributes` is no longer filterable.
///
/// ```
/// use keel_search::IndexSettings;
///
/// let settings = IndexSettings::new()
///     .searchable(["title", "description"])
///     .filterable(["category", "price"])
///     .sortable(["price"])
///     .synonym("kettle", ["teapot"]);
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexSettings {
    /// Attributes the query text is matched against, by importance
    /// (`None`: every attribute).
    pub searchable_attributes: Option<Vec<String>>,
    /// Attributes usable in filters and facets.
    pub filterable_attributes: Vec<String>,
    /// Attributes usable in sorts.
    pub sortable_attributes: Vec<String>,
    /// Ranking rules (`None`: [`DEFAULT_RANKING_RULES`]). Besides the
    /// built-in rules, `field:asc` / `field:desc` rank by an attribute.
    pub ranking_rules: Option<Vec<String>>,
    /// Word → words that also match it.
    pub synonyms: BTreeMap<String, Vec<String>>,
}

impl IndexSettings {
    /// Default settings: everything searchable, nothing filterable or
    /// sortable.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the searchable attributes, by importance.
    #[must_use]
    pub fn searchable<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Self {
        self.searchable_attributes = Some(fields.into_iter().map(Into::into).collect());
        self
    }

    /// Sets the filterable attributes.
    #[must_use]
    pub fn filterable<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Self {
        self.filterable_attributes = fields.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the sortable attributes.
    #[must_use]
    pub fn sortable<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Self {
        self.sortable_attributes = fields.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the ranking rules.
    #[must_use]
    pub fn ranking_rules<S: Into<String>>(mut self, rules: impl IntoIterator<Item = S>) -> Self {
        self.ranking_rules = Some(rules.into_iter().map(Into::into).collect());
        self
    }

    /// Adds synonyms of `word` (one-way: `word` also finds them).
    #[must_use]
    pub fn synonym<S: Into<String>>(
        mut self,
        word: impl Into<String>,
        synonyms: impl IntoIterator<Item = S>,
    ) -> Self {
        self.synonyms
            .entry(word.into())
            .or_default()
            .extend(synonyms.into_iter().map(Into::into));
        self
    }

    /// The ranking rules in effect.
    #[must_use]
    pub fn effective_ranking_rules(&self) -> Vec<String> {
        self.ranking_rules.clone().unwrap_or_else(|| {
            DEFAULT_RANKING_RULES
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        })
    }

    /// The canonical form both engines report: `searchable` `["*"]` as
    /// `None`, the default ranking rules as `None`, attribute lists sorted
    /// without duplicates, synonym lists sorted.
    #[must_use]
    pub fn normalized(mut self) -> Self {
        self.normalize();
        self
    }

    pub(crate) fn normalize(&mut self) {
        if self
            .searchable_attributes
            .as_ref()
            .is_some_and(|f| f.len() == 1 && f[0] == "*")
        {
            self.searchable_attributes = None;
        }
        let is = |rules: &[String], defaults: &[&str]| {
            rules.len() == defaults.len() && rules.iter().zip(defaults).all(|(a, b)| a == b)
        };
        if self
            .ranking_rules
            .as_ref()
            .is_some_and(|r| is(r, &DEFAULT_RANKING_RULES) || is(r, &SPLIT_DEFAULT_RANKING_RULES))
        {
            self.ranking_rules = None;
        }
        for list in [
            &mut self.filterable_attributes,
            &mut self.sortable_attributes,
        ] {
            list.sort();
            list.dedup();
        }
        for synonyms in self.synonyms.values_mut() {
            synonyms.sort();
            synonyms.dedup();
        }
    }

    /// Checks attribute names, ranking rules and synonyms.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidField`] or [`SearchError::InvalidArgument`].
    pub fn validate(&self) -> Result<()> {
        if let Some(fields) = &self.searchable_attributes {
            for f in fields {
                if f != "*" {
                    check_field(f)?;
                }
            }
        }
        for f in self
            .filterable_attributes
            .iter()
            .chain(&self.sortable_attributes)
        {
            check_field(f)?;
        }
        if let Some(rules) = &self.ranking_rules {
            for rule in rules {
                let ok = BUILT_IN_RANKING_RULES.contains(&rule.as_str())
                    || rule.rsplit_once(':').is_some_and(|(f, d)| {
                        check_field(f).is_ok() && matches!(d, "asc" | "desc")
                    });
                if !ok {
                    return Err(SearchError::invalid(
                        "ranking_rules",
                        format!("unknown ranking rule {rule:?}"),
                    ));
                }
            }
        }
        for (word, synonyms) in &self.synonyms {
            if word.trim().is_empty() || synonyms.iter().any(|s| s.trim().is_empty()) {
                return Err(SearchError::invalid(
                    "synonyms",
                    "synonyms must not be empty",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(names: &[&str]) -> IndexSettings {
        IndexSettings::new().ranking_rules(names.iter().copied())
    }

    #[test]
    fn both_default_lists_read_back_as_the_defaults() {
        assert_eq!(
            rules(&DEFAULT_RANKING_RULES).normalized().ranking_rules,
            None
        );
        assert_eq!(
            rules(&SPLIT_DEFAULT_RANKING_RULES)
                .normalized()
                .ranking_rules,
            None
        );
        // Another order is a custom list.
        let custom = rules(&[
            "typo",
            "words",
            "proximity",
            "attribute",
            "sort",
            "exactness",
        ]);
        assert!(custom.normalized().ranking_rules.is_some());
    }

    #[test]
    fn newer_rule_names_are_accepted_and_unknown_ones_refused() {
        assert!(
            rules(&["words", "attributeRank", "wordPosition", "price:asc"])
                .validate()
                .is_ok()
        );
        let err = rules(&["words", "popularity"]).validate().unwrap_err();
        assert!(err.to_string().contains("popularity"), "{err}");
    }
}

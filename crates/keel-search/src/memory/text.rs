//! Query words, synonyms, matching and highlighting.

use std::collections::HashMap;

use serde_json::Value;

use super::eval::raw_at;
use crate::query::Document;
use crate::settings::IndexSettings;

/// Splits text into lower-case words.
pub(super) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

pub(super) struct Query {
    /// Per query word, the words that match it (itself and its synonyms).
    terms: Vec<Vec<String>>,
    /// Whether the last word matches as a prefix.
    prefix_last: bool,
}

impl Query {
    pub(super) fn parse(text: &str, settings: &IndexSettings) -> Self {
        let synonyms: HashMap<String, Vec<String>> = settings
            .synonyms
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.iter().flat_map(|s| words(s)).collect()))
            .collect();
        let terms = words(text)
            .into_iter()
            .map(|w| {
                let mut alternatives = vec![w.clone()];
                if let Some(more) = synonyms.get(&w) {
                    alternatives.extend(more.iter().cloned());
                }
                alternatives
            })
            .collect();
        Self {
            terms,
            prefix_last: !text.ends_with(char::is_whitespace),
        }
    }

    /// How a word of a document matches query term `i`: `Some(true)`
    /// exactly, `Some(false)` as a prefix.
    fn matches(&self, i: usize, word: &str) -> Option<bool> {
        let alternatives = &self.terms[i];
        if alternatives.iter().any(|t| t == word) {
            return Some(true);
        }
        let prefix = self.prefix_last && i + 1 == self.terms.len();
        (prefix && alternatives.iter().any(|t| word.starts_with(t.as_str()))).then_some(false)
    }

    /// `None` when the document does not match; otherwise how many terms
    /// match exactly and the first searchable attribute that matches.
    pub(super) fn score(&self, doc: &Document, settings: &IndexSettings) -> Option<(usize, usize)> {
        if self.terms.is_empty() {
            return Some((0, 0));
        }
        let attributes = searchable(doc, settings);
        let mut best: Vec<Option<bool>> = vec![None; self.terms.len()];
        let mut first_attribute = usize::MAX;
        for (rank, texts) in attributes.iter().enumerate() {
            for word in texts.iter().flat_map(|t| words(t)) {
                for (i, slot) in best.iter_mut().enumerate() {
                    if let Some(exact) = self.matches(i, &word) {
                        *slot = Some(slot.unwrap_or(false) || exact);
                        first_attribute = first_attribute.min(rank);
                    }
                }
            }
        }
        if best.iter().any(Option::is_none) {
            return None;
        }
        Some((
            best.iter().filter(|b| **b == Some(true)).count(),
            first_attribute,
        ))
    }

    pub(super) fn highlight(
        &self,
        doc: &Document,
        fields: &[String],
        pre: &str,
        post: &str,
    ) -> Document {
        let mut out = doc.clone();
        let all = fields.iter().any(|f| f == "*");
        for (key, value) in &mut out {
            if all || fields.iter().any(|f| f == key) {
                self.highlight_value(value, pre, post);
            }
        }
        out
    }

    fn highlight_value(&self, value: &mut Value, pre: &str, post: &str) {
        match value {
            Value::String(s) => *s = self.highlight_text(s, pre, post),
            Value::Array(items) => items
                .iter_mut()
                .for_each(|v| self.highlight_value(v, pre, post)),
            Value::Object(map) => map
                .values_mut()
                .for_each(|v| self.highlight_value(v, pre, post)),
            _ => {}
        }
    }

    fn highlight_text(&self, text: &str, pre: &str, post: &str) -> String {
        let mut out = String::with_capacity(text.len() + 16);
        let mut rest = text;
        while !rest.is_empty() {
            let start = rest.find(char::is_alphanumeric).unwrap_or(rest.len());
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let end = rest
                .find(|c: char| !c.is_alphanumeric())
                .unwrap_or(rest.len());
            let word = &rest[..end];
            let lower = word.to_lowercase();
            let matched = (0..self.terms.len()).find_map(|i| {
                let exact = self.matches(i, &lower)?;
                if exact {
                    return Some(word.len());
                }
                // A prefix match highlights the matched part only.
                let len = self.terms[i]
                    .iter()
                    .filter(|t| lower.starts_with(t.as_str()))
                    .map(|t| t.chars().count())
                    .max()?;
                word.char_indices()
                    .nth(len)
                    .map(|(b, _)| b)
                    .or(Some(word.len()))
            });
            match matched {
                Some(len) if len > 0 => {
                    out.push_str(pre);
                    out.push_str(&word[..len]);
                    out.push_str(post);
                    out.push_str(&word[len..]);
                }
                _ => out.push_str(word),
            }
            rest = &rest[end..];
        }
        out
    }
}

/// The searchable texts of a document, one list per attribute, in order
/// of importance.
fn searchable(doc: &Document, settings: &IndexSettings) -> Vec<Vec<String>> {
    fn texts(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|i| texts(i, out)),
            Value::Object(map) => map.values().for_each(|i| texts(i, out)),
            _ => {}
        }
    }
    let fields: Vec<String> = match &settings.searchable_attributes {
        Some(f) if !f.iter().any(|x| x == "*") => f.clone(),
        _ => doc.keys().cloned().collect(),
    };
    fields
        .iter()
        .map(|f| {
            let mut out = Vec::new();
            if let Some(v) = raw_at(doc, f) {
                texts(v, &mut out);
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlighting_wraps_whole_words_and_prefixes() {
        let q = Query::parse("blue kett", &IndexSettings::default());
        assert_eq!(
            q.highlight_text("A Blue kettle, bluebird", "[", "]"),
            "A [Blue] [kett]le, bluebird"
        );
    }
}

//! Kubernetes label selectors (`metav1.LabelSelector`) with the API server's
//! semantics: `matchLabels` and every `matchExpressions` entry are ANDed, an
//! empty selector matches everything, `NotIn` and `DoesNotExist` match objects
//! that lack the key. Selectors are validated once, up front, so that a
//! malformed one is reported instead of silently matching nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid label key {key:?}: {why}")]
    Key { key: String, why: &'static str },
    #[error("invalid label value {value:?} for key {key:?}: {why}")]
    Value {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error(
        "unknown operator {operator:?} for key {key:?} (expected In, NotIn, Exists or DoesNotExist)"
    )]
    Operator { key: String, operator: String },
    #[error("operator {operator} for key {key:?} needs at least one value")]
    MissingValues { key: String, operator: &'static str },
    #[error("operator {operator} for key {key:?} takes no values, got {count}")]
    UnexpectedValues {
        key: String,
        operator: &'static str,
        count: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every object (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn parse(sel: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            validate_key(k)?;
            validate_value(k, v)?;
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for expr in sel.match_expressions.iter().flatten() {
            let key = &expr.key;
            validate_key(key)?;
            let values = expr.values.as_deref().unwrap_or_default();
            let needs_values = |operator: &'static str| {
                if values.is_empty() {
                    return Err(SelectorError::MissingValues {
                        key: key.clone(),
                        operator,
                    });
                }
                for v in values {
                    validate_value(key, v)?;
                }
                Ok(values.iter().cloned().collect::<BTreeSet<_>>())
            };
            let no_values = |operator: &'static str| {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err(SelectorError::UnexpectedValues {
                        key: key.clone(),
                        operator,
                        count: values.len(),
                    })
                }
            };
            requirements.push(match expr.operator.as_str() {
                "In" => Requirement::In(key.clone(), needs_values("In")?),
                "NotIn" => Requirement::NotIn(key.clone(), needs_values("NotIn")?),
                "Exists" => {
                    no_values("Exists")?;
                    Requirement::Exists(key.clone())
                }
                "DoesNotExist" => {
                    no_values("DoesNotExist")?;
                    Requirement::DoesNotExist(key.clone())
                }
                other => {
                    return Err(SelectorError::Operator {
                        key: key.clone(),
                        operator: other.to_string(),
                    });
                }
            });
        }
        Ok(Self { requirements })
    }

    /// Parses an optional selector where absence means "everything" (as for
    /// `podSelector` and `nodeSelector`).
    pub fn parse_optional(sel: Option<&LabelSelector>) -> Result<Self, SelectorError> {
        sel.map_or_else(|| Ok(Self::everything()), Self::parse)
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
        })
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// A qualified name: `[prefix/]name`, name at most 63 characters of
/// `[A-Za-z0-9_.-]` starting and ending alphanumeric; prefix a DNS subdomain.
fn validate_key(key: &str) -> Result<(), SelectorError> {
    let err = |why| {
        Err(SelectorError::Key {
            key: key.to_string(),
            why,
        })
    };
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return err("prefix must be 1 to 253 characters");
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !prefix.split('.').all(label_ok) {
            return err("prefix must be a lowercase DNS subdomain");
        }
    }
    if name.is_empty() || name.len() > 63 {
        return err("name part must be 1 to 63 characters");
    }
    if !name.chars().all(is_name_char) {
        return err("name part may only contain alphanumerics, '-', '_' and '.'");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return err("name part must start and end with an alphanumeric character");
    }
    Ok(())
}

fn validate_value(key: &str, value: &str) -> Result<(), SelectorError> {
    let err = |why| {
        Err(SelectorError::Value {
            key: key.to_string(),
            value: value.to_string(),
            why,
        })
    };
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 {
        return err("at most 63 characters");
    }
    if !value.chars().all(is_name_char) {
        return err("may only contain alphanumerics, '-', '_' and '.'");
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !value.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return err("must start and end with an alphanumeric character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(json: serde_json::Value) -> LabelSelector {
        serde_json::from_value(json).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matches(s: serde_json::Value, l: &[(&str, &str)]) -> bool {
        Selector::parse(&sel(s)).unwrap().matches(Some(&labels(l)))
    }

    #[test]
    fn empty_selector_matches_everything_even_without_labels() {
        let s = Selector::parse(&sel(serde_json::json!({}))).unwrap();
        assert!(s.matches(None));
        assert!(s.matches(Some(&labels(&[("a", "b")]))));
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let s = serde_json::json!({"matchLabels": {"team": "a", "env": "prod"}});
        assert!(matches(
            s.clone(),
            &[("team", "a"), ("env", "prod"), ("x", "y")]
        ));
        assert!(!matches(s.clone(), &[("team", "a")]));
        assert!(!matches(s, &[("team", "a"), ("env", "dev")]));
    }

    #[test]
    fn in_operator() {
        let s = serde_json::json!({"matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "staging"]}]});
        assert!(matches(s.clone(), &[("env", "staging")]));
        assert!(!matches(s.clone(), &[("env", "dev")]));
        assert!(!matches(s, &[]));
    }

    #[test]
    fn not_in_matches_missing_key() {
        // As in the OVN-K documentation example: namespaces without an
        // `environment` label are selected too.
        let s = serde_json::json!({"matchExpressions": [
            {"key": "environment", "operator": "NotIn", "values": ["development"]}]});
        assert!(matches(s.clone(), &[]));
        assert!(matches(s.clone(), &[("environment", "production")]));
        assert!(!matches(s, &[("environment", "development")]));
    }

    #[test]
    fn exists_and_does_not_exist_ignore_the_value() {
        let ex = serde_json::json!({"matchExpressions": [
            {"key": "k8s.ovn.org/egress-assignable", "operator": "Exists"}]});
        assert!(matches(
            ex.clone(),
            &[("k8s.ovn.org/egress-assignable", "")]
        ));
        assert!(!matches(ex, &[("other", "")]));
        let dne = serde_json::json!({"matchExpressions": [
            {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist", "values": []}]});
        assert!(matches(dne.clone(), &[("kubernetes.io/os", "linux")]));
        assert!(!matches(
            dne,
            &[("node-role.kubernetes.io/control-plane", "")]
        ));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["canary"]}]});
        assert!(matches(s.clone(), &[("app", "web")]));
        assert!(!matches(s.clone(), &[("app", "web"), ("tier", "canary")]));
        assert!(!matches(s, &[("tier", "stable")]));
    }

    #[test]
    fn malformed_selectors_are_rejected_with_the_bad_input_named() {
        let cases = [
            (
                serde_json::json!({"matchExpressions": [{"key": "env", "operator": "in", "values": ["a"]}]}),
                "\"in\"",
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "env", "operator": "In"}]}),
                "needs at least one value",
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "env", "operator": "Exists", "values": ["x"]}]}),
                "takes no values",
            ),
            (
                serde_json::json!({"matchLabels": {"bad key": "x"}}),
                "\"bad key\"",
            ),
            (
                serde_json::json!({"matchLabels": {"Example.com/x": "y"}}),
                "lowercase DNS subdomain",
            ),
            (
                serde_json::json!({"matchLabels": {"app": "-web"}}),
                "\"-web\"",
            ),
            (
                serde_json::json!({"matchLabels": {"app": "x".repeat(64)}}),
                "at most 63",
            ),
            (serde_json::json!({"matchLabels": {"a/": "x"}}), "1 to 63"),
        ];
        for (s, needle) in cases {
            let err = Selector::parse(&sel(s.clone())).unwrap_err().to_string();
            assert!(err.contains(needle), "{s}: {err}");
        }
    }

    #[test]
    fn valid_qualified_keys_and_empty_values_are_accepted() {
        let s = serde_json::json!({"matchLabels": {
            "kubernetes.io/metadata.name": "team-a",
            "k8s.ovn.org/egress-assignable": "",
            "app.kubernetes.io/name": "My_App.v2"}});
        Selector::parse(&sel(s)).unwrap();
    }

    #[test]
    fn absent_optional_selector_means_everything() {
        assert!(Selector::parse_optional(None).unwrap().matches(None));
    }
}

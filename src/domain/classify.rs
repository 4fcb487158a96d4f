//! IVR path → category and severity (contract §3): the `[[ivr]]` row with the
//! longest matching prefix, else `incident-<category>` in the Request-URI with
//! that category's default severity, else `[ivr_default]`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::incident::Severity;
use super::ivr::IvrPath;

/// One row of the IVR map (`[[ivr]]`): a path prefix and what it means.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IvrRule {
    pub path: String,
    pub category: String,
    pub severity: Severity,
    #[serde(default)]
    pub instructions: String,
}

/// `[ivr_default]`: what a call that matches nothing is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IvrDefault {
    pub category: String,
    pub severity: Severity,
    pub instructions: String,
}

impl Default for IvrDefault {
    fn default() -> Self {
        IvrDefault { category: "triage".into(), severity: Severity::Medium, instructions: String::new() }
    }
}

/// Category names end up in metric labels and Redis keys: keep them tame.
pub fn is_category_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The result of classification, with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub category: String,
    pub severity: Severity,
    pub instructions: String,
    /// `ivr:<path>`, `uri`, or `default`.
    pub rule: String,
}

#[derive(Debug, Clone)]
struct Rule {
    path: IvrPath,
    category: String,
    severity: Severity,
    instructions: String,
}

/// The IVR map, built once from the settings (and again on reload).
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
    categories: BTreeMap<String, Severity>,
    default: Classification,
}

impl Classification {
    /// The rule of a call that matched nothing: `[ivr_default]`.
    pub const DEFAULT_RULE: &'static str = "default";
}

impl Classifier {
    /// The map of `[[ivr]]`, `[categories]` and `[ivr_default]`.
    pub fn new(ivr: &[IvrRule], known: &BTreeMap<String, Severity>, d: &IvrDefault) -> Self {
        let rules: Vec<Rule> = ivr
            .iter()
            .map(|r| Rule {
                path: IvrPath::lenient(&r.path),
                category: r.category.clone(),
                severity: r.severity,
                instructions: r.instructions.clone(),
            })
            .collect();
        // A category's default: `[categories]` when given, else the most severe of its IVR rows.
        let mut categories = BTreeMap::new();
        for r in &rules {
            let e = categories.entry(r.category.clone()).or_insert(r.severity);
            *e = (*e).min(r.severity);
        }
        categories.extend(known.iter().map(|(k, v)| (k.clone(), *v)));
        categories.entry(d.category.clone()).or_insert(d.severity);
        Classifier {
            rules,
            categories,
            default: Classification {
                category: d.category.clone(),
                severity: d.severity,
                instructions: d.instructions.clone(),
                rule: Classification::DEFAULT_RULE.into(),
            },
        }
    }

    /// Classifies a call from its IVR selections and Request-URI user.
    pub fn classify(&self, ivr_path: &IvrPath, ruri_user: Option<&str>) -> Classification {
        let best = self.rules.iter().filter(|r| ivr_path.starts_with(&r.path)).max_by_key(|r| r.path.len());
        if let Some(r) = best {
            return Classification {
                category: r.category.clone(),
                severity: r.severity,
                instructions: r.instructions.clone(),
                rule: format!("ivr:{}", r.path),
            };
        }
        // Only categories the deployment knows: the URI is caller-controlled
        // input and categories become metric labels.
        if let Some(cat) = ruri_user.and_then(|u| u.strip_prefix("incident-"))
            && let Some(sev) = self.categories.get(cat)
        {
            let instructions = self
                .rules
                .iter()
                .find(|r| r.category == cat && !r.instructions.is_empty())
                .map(|r| r.instructions.clone())
                .unwrap_or_default();
            return Classification { category: cat.to_string(), severity: *sev, instructions, rule: "uri".into() };
        }
        self.default.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier() -> Classifier {
        let rule = |p: &str, c: &str, sev| IvrRule {
            path: p.into(),
            category: c.into(),
            severity: sev,
            instructions: format!("do {c}"),
        };
        let ivr = vec![
            rule("2", "power", Severity::High),
            rule("2,1", "outage", Severity::Critical),
            rule("3", "billing", Severity::Low),
            rule("4,1", "billing", Severity::Medium),
        ];
        let known = BTreeMap::from([("gas".to_string(), Severity::Critical)]);
        Classifier::new(&ivr, &known, &IvrDefault::default())
    }

    fn p(s: &str) -> IvrPath {
        IvrPath::lenient(s)
    }

    #[test]
    fn longest_prefix_wins() {
        let c = classifier();
        assert_eq!(c.classify(&p("2,1,9"), None).category, "outage");
        assert_eq!(c.classify(&p("2,1"), None).rule, "ivr:2,1");
        assert_eq!(c.classify(&p("2,2"), None).category, "power");
        assert_eq!(c.classify(&p("2"), None).severity, Severity::High);
        // "21" is one selection, not "2" then "1".
        assert_eq!(c.classify(&p("21"), None).rule, "default");
    }

    #[test]
    fn uri_category_then_default() {
        let c = classifier();
        let k = c.classify(&IvrPath::default(), Some("incident-billing"));
        assert_eq!((k.category.as_str(), k.severity, k.rule.as_str()), ("billing", Severity::Medium, "uri"));
        assert_eq!(c.classify(&IvrPath::default(), Some("incident-gas")).severity, Severity::Critical);
        // Unknown categories in the URI are not invented.
        assert_eq!(c.classify(&IvrPath::default(), Some("incident-<script>")).rule, "default");
        assert_eq!(c.classify(&p("9"), Some("incident-nope")).category, "triage");
        // The IVR path beats the URI.
        assert_eq!(c.classify(&p("3"), Some("incident-gas")).category, "billing");
    }
}

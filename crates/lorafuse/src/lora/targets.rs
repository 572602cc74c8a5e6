//! Which modules a [`LoraConfig`] adapts: `target_modules`, `exclude_modules` and
//! `layers_to_transform` compiled once, matched like PEFT's `check_target_module_exists`.

use super::config::{LoraConfig, OneOrMany, TargetModules};
use crate::{Error, Result};
use regex::Regex;

/// A compiled `target_modules` + `layers_to_transform` rule.
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    rule: Rule,
    exclude: Option<Rule>,
    layers: Option<OneOrMany<usize>>,
    layer_res: Vec<Regex>,
}

#[derive(Debug, Clone)]
enum Rule {
    Names(Vec<String>),
    Regex(Regex),
    AllLinear,
}

/// `path == name` or `path` ends with `.name`.
fn name_matches(path: &str, name: &str) -> bool {
    path == name
        || (path.len() > name.len()
            && path.ends_with(name)
            && path.as_bytes()[path.len() - name.len() - 1] == b'.')
}

impl Rule {
    fn from_targets(t: TargetModules, field: &str) -> Result<Self> {
        Ok(match t {
            TargetModules::List(names) => Rule::Names(names),
            TargetModules::Pattern(p) => Rule::Regex(
                Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| Error::Invalid(format!("{field} regex `{p}`: {e}")))?,
            ),
        })
    }
}

impl TargetMatcher {
    pub(crate) fn new(cfg: &LoraConfig, default_targets: &[&str]) -> Result<Self> {
        let targets = match &cfg.target_modules {
            Some(t) => t.clone(),
            None => TargetModules::names(default_targets),
        };
        let rule = if targets.is_all_linear() {
            Rule::AllLinear
        } else {
            Rule::from_targets(targets, "target_modules")?
        };
        let exclude = match &cfg.exclude_modules {
            Some(TargetModules::List(l)) if l.is_empty() => None,
            Some(t) => Some(Rule::from_targets(t.clone(), "exclude_modules")?),
            None => None,
        };
        // PEFT takes the first numbered segment so that nested indices (MoE experts) are skipped.
        let layer_res = match &cfg.layers_pattern {
            None => vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.")],
            Some(p) if p.is_empty() => vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.")],
            Some(OneOrMany::One(p)) => vec![Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\."))],
            Some(OneOrMany::Many(ps)) => ps
                .iter()
                .map(|p| Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\.")))
                .collect(),
        }
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("layers_pattern: {e}")))?;
        let layers = cfg.layers_to_transform.clone().filter(|l| !l.is_empty());
        Ok(Self {
            rule,
            exclude,
            layers,
            layer_res,
        })
    }

    /// The layer index PEFT reads from `path`.
    fn layer_index(&self, path: &str) -> Option<usize> {
        self.layer_res
            .iter()
            .find_map(|re| re.captures(path))
            .and_then(|c| c.get(1)?.as_str().parse().ok())
    }

    /// Whether the module at `path` gets an adapter.
    pub fn matches(&self, path: &str) -> bool {
        match &self.exclude {
            Some(Rule::Names(n)) if n.iter().any(|n| name_matches(path, n)) => return false,
            Some(Rule::Regex(re)) if re.is_match(path) => return false,
            _ => {}
        }
        match &self.rule {
            Rule::Regex(re) => re.is_match(path),
            // `all-linear` becomes a list of full paths in PEFT, so layers_to_transform does not apply.
            Rule::AllLinear => path != "lm_head" && !path.ends_with(".lm_head"),
            Rule::Names(names) => {
                if names.iter().any(|n| n == path) {
                    return true;
                }
                let found = names.iter().any(|n| name_matches(path, n));
                match (&self.layers, found) {
                    (Some(layers), true) => {
                        self.layer_index(path).is_some_and(|i| layers.contains(&i))
                    }
                    _ => found,
                }
            }
        }
    }

    /// The rule in words, for "nothing matched" errors.
    pub fn describe(&self) -> String {
        let base = match &self.rule {
            Rule::Names(n) => format!("target_modules {n:?}"),
            Rule::Regex(re) => format!("target_modules regex `{}`", re.as_str()),
            Rule::AllLinear => "target_modules \"all-linear\"".to_owned(),
        };
        match &self.layers {
            Some(l) => format!("{base} with layers_to_transform {l:?}"),
            None => base,
        }
    }
}

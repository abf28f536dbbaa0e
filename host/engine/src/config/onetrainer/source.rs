//! A OneTrainer JSON object read key by key: every key read is removed, so what is left at the
//! end is exactly what was not imported, and is reported by name with its value.

use serde_json::{Map, Value};

/// What the import could not carry over, or carried over approximately.
#[derive(Debug, Default)]
pub struct Report {
    /// `key path = value` of every OneTrainer setting Ferrite has no option for.
    pub not_imported: Vec<(String, String)>,
    /// Settings carried over with a change worth knowing (an approximation, a OneTrainer value
    /// Ferrite lacks replaced by the nearest one, a rule Ferrite enforces).
    pub notes: Vec<String>,
    /// What the imported config needs changed before it trains as OneTrainer's would.
    pub problems: Vec<String>,
}

impl Report {
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
}

/// One JSON object of the config, at `path` (e.g. `concepts[0].image`).
pub struct Obj {
    pub path: String,
    map: Map<String, Value>,
}

impl Obj {
    pub fn new(path: impl Into<String>, map: Map<String, Value>) -> Self {
        Self {
            path: path.into(),
            map,
        }
    }

    pub fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    /// The value of `k`, removed; `None` when it is missing or null (OneTrainer's "not set").
    pub fn take(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k).filter(|v| !v.is_null())
    }

    /// The value of `k`, removed, null included: `None` only when the key is missing (then
    /// OneTrainer's default applies, where a null may mean "off").
    pub fn take_raw(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k)
    }

    /// Puts a value back (it will be reported as not imported unless read again).
    pub fn put(&mut self, k: &str, v: Value) {
        self.map.insert(k.to_string(), v);
    }

    /// A typed value; one of the wrong type is left in place and so reported with the rest.
    fn typed<T>(&mut self, k: &str, f: impl Fn(&Value) -> Option<T>) -> Option<T> {
        let v = self.take(k)?;
        match f(&v) {
            Some(t) => Some(t),
            None => {
                self.put(k, v);
                None
            }
        }
    }

    pub fn bool(&mut self, k: &str) -> Option<bool> {
        self.typed(k, Value::as_bool)
    }

    /// A number; OneTrainer also writes numbers as strings, and infinities as "inf".
    pub fn f64(&mut self, k: &str) -> Option<f64> {
        self.typed(k, |v| match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        })
    }

    /// A whole number from 0 to i64::MAX (what a TOML file holds); OneTrainer writes some as
    /// `7.0` or `"7"`.
    pub fn usize(&mut self, k: &str) -> Option<usize> {
        self.typed(k, |v| {
            let n = match v {
                Value::Number(n) => n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.2e18)
                        .map(|f| f as u64)
                }),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            }?;
            (n <= i64::MAX as u64).then_some(n as usize)
        })
    }

    pub fn str(&mut self, k: &str) -> Option<String> {
        self.typed(k, |v| v.as_str().map(str::to_string))
    }

    /// A nested object.
    pub fn obj(&mut self, k: &str) -> Option<Obj> {
        let key = self.key(k);
        self.typed(k, |v| v.as_object().cloned())
            .map(|m| Obj::new(key, m))
    }

    /// A list of objects (non-objects in it are left to be reported).
    pub fn objs(&mut self, k: &str) -> Option<Vec<Obj>> {
        let key = self.key(k);
        let items = self.typed(k, |v| v.as_array().cloned())?;
        Some(
            items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::Object(m) => Some(Obj::new(format!("{key}[{i}]"), m)),
                    _ => None,
                })
                .collect(),
        )
    }

    /// Drops every key but `keys` (fields OneTrainer writes for other uses of the same object).
    pub fn keep_only(&mut self, keys: &[&str]) {
        self.map.retain(|k, _| keys.contains(&k.as_str()));
    }

    /// Reports every key not read (nulls and `__version` aside) as not imported.
    pub fn finish(mut self, report: &mut Report) {
        self.map.remove("__version");
        for (k, v) in std::mem::take(&mut self.map) {
            if !v.is_null() {
                report.not_imported.push((self.key(&k), v.to_string()));
            }
        }
    }
}

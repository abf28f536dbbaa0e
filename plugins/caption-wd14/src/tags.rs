//! A WD tagger's `selected_tags.csv` and the caption its probabilities make (OneTrainer's
//! WDModel.generate_caption).

use std::path::Path;

use ferrite_plugin_api::{Error, Result, bail};

use crate::Options;

/// The tags in the model's output order, by category.
pub struct Tags {
    names: Vec<String>,
    general: Vec<usize>,
    character: Vec<usize>,
    rating: Vec<usize>,
}

impl Tags {
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display();
        let mut r =
            csv::Reader::from_path(path).map_err(|e| Error(format!("wd14: {shown}: {e}")))?;
        let header = r
            .headers()
            .map_err(|e| Error(format!("wd14: {shown}: {e}")))?
            .clone();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| Error(format!("wd14: {shown} has no `{name}` column")))
        };
        let (name, category) = (column("name")?, column("category")?);
        let mut tags = Self {
            names: Vec::new(),
            general: Vec::new(),
            character: Vec::new(),
            rating: Vec::new(),
        };
        for (i, row) in r.records().enumerate() {
            let row = row.map_err(|e| Error(format!("wd14: {shown}: {e}")))?;
            match row.get(category) {
                Some("0") => tags.general.push(i),
                Some("4") => tags.character.push(i),
                Some("9") => tags.rating.push(i),
                _ => {}
            }
            tags.names
                .push(row.get(name).unwrap_or_default().to_string());
        }
        if tags.names.is_empty() {
            bail!("wd14: {shown} lists no tags");
        }
        Ok(tags)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The caption for the model's probabilities.
    pub fn caption(&self, probs: &[f32], o: &Options) -> String {
        let probs: Vec<f64> = probs.iter().map(|&p| p as f64).collect();
        let of = |idx: &[usize]| idx.iter().map(|&i| probs[i]).collect::<Vec<_>>();
        let mut general = o.general_threshold.unwrap_or(0.35);
        if o.use_mcut_general && !self.general.is_empty() {
            general = mcut(&of(&self.general)).max(o.min_general_threshold);
        }
        let mut character = o.character_threshold;
        if o.use_mcut_character && !self.character.is_empty() {
            character = mcut(&of(&self.character))
                .max(0.15)
                .max(o.min_character_threshold);
        }
        let above = |idx: &[usize], t: f64| {
            let mut v: Vec<usize> = idx.iter().copied().filter(|&i| probs[i] > t).collect();
            // By probability, highest first; ties keep the file's order (Python's stable sort).
            v.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            v
        };
        let mut out = Vec::new();
        if o.include_rating
            && let Some(&top) = self
                .rating
                .iter()
                .max_by(|&&a, &&b| probs[a].total_cmp(&probs[b]))
        {
            out.push(top);
        }
        out.extend(above(&self.character, character));
        out.extend(above(&self.general, general));
        out.iter()
            .map(|&i| self.names[i].replace('_', " "))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// MCut: the midpoint of the largest gap between consecutive sorted probabilities (0 for one).
pub fn mcut(probs: &[f64]) -> f64 {
    if probs.len() <= 1 {
        return 0.0;
    }
    let mut sorted = probs.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let (mut best, mut at) = (f64::NEG_INFINITY, 0);
    for (i, w) in sorted.windows(2).enumerate() {
        if w[0] - w[1] > best {
            (best, at) = (w[0] - w[1], i);
        }
    }
    (sorted[at] + sorted[at + 1]) / 2.0
}

#[cfg(test)]
mod tests {
    use super::mcut;

    #[test]
    fn mcut_cuts_at_the_largest_gap() {
        assert_eq!(mcut(&[0.9]), 0.0);
        assert!((mcut(&[0.1, 0.95, 0.9, 0.2]) - 0.55).abs() < 1e-12);
        assert!((mcut(&[0.5, 0.45, 0.05]) - 0.25).abs() < 1e-12);
    }
}

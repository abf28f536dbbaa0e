//! A caption as the concept's text options make it, the way OneTrainer's pipeline does: one line
//! of the image's captions, then tag dropout and shuffling after the first `keep_tags_count`
//! tags, then capitalisation randomised per tag.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::config::ConceptConfig;

/// One caption drawn from `lines` and varied by the concept's text options.
pub fn draw(lines: &[String], c: &ConceptConfig, r: &mut ChaCha8Rng) -> String {
    let line = lines.choose(r).map(String::as_str).unwrap_or("");
    vary(line, c, r)
}

/// The caption with the concept's tag and capitalisation options applied.
pub fn vary(caption: &str, c: &ConceptConfig, r: &mut ChaCha8Rng) -> String {
    let caption = if c.caps_randomize_enable && c.caps_randomize_lowercase {
        caption.to_lowercase()
    } else {
        caption.to_string()
    };
    let caps = c.caps_randomize_enable && c.caps_randomize_probability > 0.0;
    if !c.enable_tag_shuffling && !c.tag_dropout_enable && !caps {
        return caption;
    }
    let tags: Vec<&str> = caption
        .split(c.tag_delimiter.as_str())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let keep = c.keep_tags_count.min(tags.len());
    let mut rest: Vec<&str> = tags[keep..].to_vec();
    if c.tag_dropout_enable {
        rest.retain(|_| !r.random_bool(c.tag_dropout_probability));
    }
    if c.enable_tag_shuffling {
        rest.shuffle(r);
    }
    let modes: Vec<&str> = c.caps_randomize_mode.split(',').map(str::trim).collect();
    let joiner = format!("{} ", c.tag_delimiter.trim_end());
    tags[..keep]
        .iter()
        .chain(&rest)
        .map(|t| {
            if caps && r.random_bool(c.caps_randomize_probability) {
                capitalise(t, modes.choose(r).copied().unwrap_or(""), r)
            } else {
                t.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(&joiner)
}

/// `caption` with every embedding placeholder as written in the config, whatever case the
/// capitalisation options gave it (`<EMBEDDING>` would be plain text to the model).
pub fn keep_placeholders(caption: String, placeholders: &[&str]) -> String {
    let mut out = caption;
    for p in placeholders.iter().filter(|p| !p.is_empty()) {
        // ASCII case folding keeps byte offsets, so a match in the folded text is one in `out`.
        let (lower, want) = (out.to_ascii_lowercase(), p.to_ascii_lowercase());
        let mut fixed = String::with_capacity(out.len());
        let mut at = 0;
        while let Some(i) = lower[at..].find(&want) {
            fixed.push_str(&out[at..at + i]);
            fixed.push_str(p);
            at += i + want.len();
        }
        fixed.push_str(&out[at..]);
        out = fixed;
    }
    out
}

/// First letter upper case, the rest lower case.
fn first_upper(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(f) => f
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// capslock: ALL CAPS; title: Each Word; first: First word only; random: rAnDOm letters.
fn capitalise(tag: &str, mode: &str, r: &mut ChaCha8Rng) -> String {
    match mode {
        "capslock" => tag.to_uppercase(),
        "title" => tag
            .split_whitespace()
            .map(first_upper)
            .collect::<Vec<_>>()
            .join(" "),
        "first" => first_upper(tag),
        "random" => tag
            .chars()
            .map(|ch| {
                if r.random_bool(0.5) {
                    ch.to_uppercase().to_string()
                } else {
                    ch.to_lowercase().to_string()
                }
            })
            .collect(),
        _ => tag.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rng;

    #[test]
    fn tags_shuffle_and_drop_after_the_kept_ones() {
        let caption = "sks dog, red collar, grass, sunny, photo";
        let mut c = ConceptConfig::default();
        let mut r = rng(0, 0, 0);
        assert_eq!(vary(caption, &c, &mut r), caption, "off by default");
        c.enable_tag_shuffling = true;
        c.keep_tags_count = 1;
        let mut orders = std::collections::HashSet::new();
        for _ in 0..20 {
            let v = vary(caption, &c, &mut r);
            assert!(v.starts_with("sks dog, "), "{v}");
            let mut tags: Vec<&str> = v.split(", ").collect();
            tags.sort();
            assert_eq!(tags, ["grass", "photo", "red collar", "sks dog", "sunny"]);
            orders.insert(v);
        }
        assert!(orders.len() > 5, "shuffled");
        c.tag_dropout_enable = true;
        c.tag_dropout_probability = 1.0;
        assert_eq!(vary(caption, &c, &mut r), "sks dog");
    }

    #[test]
    fn placeholders_keep_their_case() {
        let c = "A PHOTO OF <EMBEDDING>, <Embedding> and <other>".to_string();
        assert_eq!(
            keep_placeholders(c, &["<embedding>", "<Other>"]),
            "A PHOTO OF <embedding>, <embedding> and <Other>"
        );
    }

    #[test]
    fn capitalisation_modes() {
        let caption = "a RED dog, Green grass";
        let mut c = ConceptConfig {
            caps_randomize_enable: true,
            caps_randomize_probability: 1.0,
            ..ConceptConfig::default()
        };
        let mut r = rng(0, 0, 0);
        for (mode, want) in [
            ("capslock", "A RED DOG, GREEN GRASS"),
            ("title", "A Red Dog, Green Grass"),
            ("first", "A red dog, Green grass"),
        ] {
            c.caps_randomize_mode = mode.into();
            assert_eq!(vary(caption, &c, &mut r), want, "{mode}");
        }
        c.caps_randomize_mode = "random".into();
        let v = vary(caption, &c, &mut r);
        assert_eq!(v.to_lowercase(), "a red dog, green grass");
        assert_ne!(v, caption);
        c.caps_randomize_probability = 0.0;
        c.caps_randomize_lowercase = true;
        assert_eq!(vary(caption, &c, &mut r), "a red dog, green grass");
    }

    #[test]
    fn a_line_is_drawn_from_the_captions() {
        let lines = ["one".to_string(), "two".to_string()];
        let c = ConceptConfig::default();
        let drawn: std::collections::BTreeSet<String> = (0..20)
            .map(|i| draw(&lines, &c, &mut rng(0, 0, i)))
            .collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), ["one", "two"]);
    }
}

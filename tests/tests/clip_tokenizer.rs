//! The CLIP tokenizer against transformers' CLIPTokenizer on ~50 varied prompts with the real
//! CLIP BPE vocabulary (fixtures from tests/fixtures/gen/clip_tokenizer.py).

use std::path::Path;

use ferrite_blocks::tokenizer::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<i64>,
    full_ids: Vec<i64>,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn dir() -> String {
    format!("{}/fixtures/tokenizer", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn ids_equal_transformers_clip_tokenizer() {
    let tok = ClipTokenizer::from_dir(Path::new(&dir())).unwrap();
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/cases.json", dir())).unwrap())
            .unwrap();
    assert!(cases.cases.len() >= 50);
    let mut failures = Vec::new();
    for c in &cases.cases {
        let got = tok.encode(&c.prompt).unwrap();
        let full = tok.tokens(&c.prompt).unwrap();
        if got != c.ids || full != c.full_ids[1..c.full_ids.len() - 1] {
            failures.push(format!(
                "{:?}\n  got  {:?}\n  want {:?}",
                c.prompt, full, &c.full_ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        cases.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn long_prompts_split_into_75_token_chunks() {
    let tok = ClipTokenizer::from_dir(Path::new(&dir())).unwrap();
    let text: String = (0..120).map(|i| format!("word{i} ")).collect();
    let all = tok.tokens(&text).unwrap();
    let chunks = tok.encode_chunks(&text).unwrap();
    assert_eq!(chunks.len(), all.len().div_ceil(75));
    for (k, c) in chunks.iter().enumerate() {
        assert_eq!(c.len(), 77);
        assert_eq!(
            (c[0], c.iter().filter(|&&i| i == tok.bos).count()),
            (tok.bos, 1)
        );
        let body: Vec<i64> = c[1..]
            .iter()
            .copied()
            .take_while(|&i| i != tok.eos)
            .collect();
        assert_eq!(body, all[k * 75..(k * 75 + 75).min(all.len())]);
    }
    assert_eq!(
        tok.encode_chunks("").unwrap(),
        vec![tok.encode("").unwrap()]
    );
}

#[test]
fn missing_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let e = ClipTokenizer::from_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("vocab.json is missing"), "{e}");
}

//! The CLIP tokenizer against transformers' CLIPTokenizer on ~50 varied prompts with the real
//! CLIP BPE vocabulary (fixtures from tests/fixtures/gen/clip_tokenizer.py).

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

/// The built-in vocabulary written out as an SD `tokenizer/` folder.
fn tokenizer_folder() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let vocab = format!("{}/../plugins/blocks/vocab", env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        format!("{vocab}/clip_vocab.json"),
        d.path().join("vocab.json"),
    )
    .unwrap();
    std::fs::copy(
        format!("{vocab}/clip_merges.txt"),
        d.path().join("merges.txt"),
    )
    .unwrap();
    d
}

#[test]
fn ids_equal_transformers_clip_tokenizer() {
    let folder = tokenizer_folder();
    for tok in [
        ClipTokenizer::openai_clip().unwrap(),
        ClipTokenizer::from_dir(folder.path()).unwrap(),
    ] {
        same_ids_as_transformers(&tok);
    }
}

fn same_ids_as_transformers(tok: &ClipTokenizer) {
    let cases = format!(
        "{}/fixtures/tokenizer/cases.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(cases).unwrap()).unwrap();
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
fn long_prompts_are_truncated_to_75_tokens() {
    let tok = ClipTokenizer::openai_clip().unwrap();
    let text: String = (0..120).map(|i| format!("word{i} ")).collect();
    let all = tok.tokens(&text).unwrap();
    assert!(all.len() > 75);
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (tok.bos, tok.eos));
    assert_eq!(ids[1..76], all[..75]);
}

#[test]
fn missing_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let e = ClipTokenizer::from_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("vocab.json is missing"), "{e}");
}

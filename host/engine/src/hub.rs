//! Hugging Face repo ids as models (`runwayml/stable-diffusion-v1-5`, `org/name@revision`):
//! resolved to the snapshot the local Hugging Face cache holds, as diffusers leaves it
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! `models--org--name/refs/<revision>` naming `snapshots/<commit>`). A repo the cache lacks is
//! downloaded into it (hf-hub: resumable, with progress bars) — the files of a diffusers pipeline
//! only — unless downloading is off (`--offline`, `HF_HUB_OFFLINE`); `HF_ENDPOINT` names
//! another hub, `HF_TOKEN` or the settings file a token.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

/// How the hub may be used, set once by the command line or the app.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Never touch the network: a repo id the cache lacks is an error.
    pub offline: bool,
    /// The token sent with downloads (`HF_TOKEN` when none is set here).
    pub token: Option<String>,
}

static ACCESS: OnceLock<Access> = OnceLock::new();

/// Sets how the hub may be used for this process (the first call counts).
pub fn configure(access: Access) {
    let _ = ACCESS.set(access);
}

fn access() -> Access {
    let mut a = ACCESS.get().cloned().unwrap_or_default();
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    // huggingface_hub's spelling of "offline".
    a.offline |= var("HF_HUB_OFFLINE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
    if a.token.is_none() {
        a.token = var("HF_TOKEN");
    }
    a
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{name} is not in the local Hugging Face cache ({cache}) and downloading is off \
         (--offline or HF_HUB_OFFLINE): download it once online, or give a folder"
    )]
    Offline { name: String, cache: String },
    #[error("downloading {name} from {endpoint}: {message}")]
    Download {
        name: String,
        endpoint: String,
        message: String,
    },
    #[error("no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME")]
    NoCache,
}

/// The local cache's folder.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache/huggingface/hub")))
}

/// Whether `name` reads as a repo id (`org/name`, optionally `@revision`) rather than a path.
fn repo_id(name: &str) -> Option<(&str, &str, &str)> {
    let (repo, revision) = name.split_once('@').unwrap_or((name, "main"));
    let (org, model) = repo.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(org) && ok(model) && ok(revision)).then_some((org, model, revision))
}

/// Whether `name` reads as a repo id (`org/name[@revision]`).
pub fn is_repo_id(name: &str) -> bool {
    repo_id(name).is_some()
}

/// The snapshot folder of repo id `name` in the cache at `cache`, if it holds it.
pub fn resolve_in(name: &str, cache: &Path) -> Option<PathBuf> {
    let (org, model, revision) = repo_id(name)?;
    let repo = cache.join(format!("models--{org}--{model}"));
    // A branch or tag names a commit in `refs`; a commit hash names its snapshot itself.
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = repo.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// Downloads repo id `name` into the local cache when it is no path, the cache lacks it, and
/// downloading is allowed; afterwards [`model_path`] finds it.
pub fn fetch_if_missing(base: &Path, name: &str) -> Result<(), HubError> {
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    if name.is_empty() || path.exists() || repo_id(name).is_none() {
        return Ok(());
    }
    let cache = cache_dir().ok_or(HubError::NoCache)?;
    if resolve_in(name, &cache).is_some() {
        return Ok(());
    }
    let access = access();
    if access.offline {
        return Err(HubError::Offline {
            name: name.to_string(),
            cache: cache.display().to_string(),
        });
    }
    download(name, &cache, &access)
}

fn download(name: &str, cache: &Path, access: &Access) -> Result<(), HubError> {
    let (org, model, revision) = repo_id(name).expect("checked by the caller");
    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string();
    let fail = |message: String| HubError::Download {
        name: name.to_string(),
        endpoint: endpoint.clone(),
        message,
    };
    let api = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_endpoint(endpoint.clone())
        .with_token(access.token.clone())
        .with_progress(true)
        .with_retries(3)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        format!("{org}/{model}"),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = repo.info().map_err(|e| fail(e.to_string()))?;
    let files = pipeline_files(info.siblings.iter().map(|s| s.rfilename.as_str()));
    if files.is_empty() {
        return Err(fail(
            "the repo has no model_index.json: it is not a diffusers pipeline (give a \
             checkpoint file's path instead)"
                .into(),
        ));
    }
    for f in &files {
        // Cached files are not fetched again; an interrupted one resumes.
        repo.get(f).map_err(|e| fail(format!("{f}: {e}")))?;
    }
    resolve_in(name, cache)
        .map(|_| ())
        .ok_or_else(|| fail("the download left no snapshot in the cache".into()))
}

/// Weight variants diffusers keeps beside the plain files (`model.fp16.safetensors`).
const VARIANTS: [&str; 5] = [".fp16.", ".bf16.", ".fp32.", ".ema.", ".non_ema."];

/// The files of a pipeline repo that a model is read from: `model_index.json` and each
/// component folder's configs, tokenizer files and weights — safetensors over `.bin`, plain
/// over variants (a variant only when nothing else is there) — but not the single-file
/// checkpoints beside them, nor the safety checker.
pub fn pipeline_files<'a>(files: impl Iterator<Item = &'a str>) -> Vec<String> {
    let files: Vec<&str> = files.collect();
    if !files.contains(&"model_index.json") {
        return Vec::new();
    }
    let mut out = vec!["model_index.json".to_string()];
    let mut folders: Vec<&str> = files
        .iter()
        .filter_map(|f| f.split_once('/').map(|(d, _)| d))
        .filter(|d| !matches!(*d, "safety_checker" | "feature_extractor"))
        .collect();
    folders.sort();
    folders.dedup();
    for folder in folders {
        let inside: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| {
                f.split_once('/')
                    .is_some_and(|(d, rest)| d == folder && !rest.contains('/'))
            })
            .collect();
        let variant = |f: &str| VARIANTS.iter().any(|v| f.contains(v));
        let weights = |f: &str| f.ends_with(".safetensors") || f.ends_with(".bin");
        // A weights file, or a sharded one's index.
        let is_weights = |f: &str| {
            weights(f) || f.ends_with(".safetensors.index.json") || f.ends_with(".bin.index.json")
        };
        let pick = |ext: &str, variants: bool| -> Vec<&str> {
            inside
                .iter()
                .copied()
                .filter(|f| is_weights(f) && f.contains(ext) && variant(f) == variants)
                .collect()
        };
        let chosen = [
            pick(".safetensors", false),
            pick(".bin", false),
            pick(".safetensors", true),
        ]
        .into_iter()
        .find(|c| !c.is_empty())
        .unwrap_or_default();
        for f in inside {
            let other =
                !is_weights(f) && [".json", ".txt", ".model"].iter().any(|e| f.ends_with(e));
            if other || chosen.contains(&f) {
                out.push(f.to_string());
            }
        }
    }
    out
}

/// `name` as a model path: itself (relative to `base`) when it exists or is not a repo id,
/// else its snapshot in the local cache when there is one.
pub fn model_path(base: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    if path.exists() {
        return path;
    }
    cache_dir()
        .and_then(|c| resolve_in(name, &c))
        .unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_repo_gives_its_components_files_only() {
        // Stable Diffusion 1.5's repo, as the hub lists it.
        let repo = [
            ".gitattributes",
            "README.md",
            "model_index.json",
            "v1-5-pruned.ckpt",
            "v1-5-pruned-emaonly.safetensors",
            "feature_extractor/preprocessor_config.json",
            "safety_checker/config.json",
            "safety_checker/model.safetensors",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",
            // A component with shards only, and one with a variant only.
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
        ];
        let got = pipeline_files(repo.into_iter());
        assert_eq!(
            got,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "text_encoder_2/config.json",
                "text_encoder_2/model.fp16.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "transformer/config.json",
                "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
                "transformer/diffusion_pytorch_model.safetensors.index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.bin",
            ]
        );
        assert!(pipeline_files(["unet/config.json"].into_iter()).is_empty());
    }

    #[test]
    fn repo_ids_resolve_to_their_cached_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny-model");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(repo.join("refs/v2"), "def456").unwrap();
        let c = cache.path();
        assert_eq!(
            resolve_in("org/tiny-model", c),
            Some(repo.join("snapshots/abc123"))
        );
        assert_eq!(
            resolve_in("org/tiny-model@v2", c),
            Some(repo.join("snapshots/def456"))
        );
        assert_eq!(
            resolve_in("org/tiny-model@def456", c),
            Some(repo.join("snapshots/def456"))
        );
        assert_eq!(resolve_in("org/tiny-model@v3", c), None);
        assert_eq!(resolve_in("org/other", c), None);
        // Paths are not repo ids.
        for path in ["a/b/c", "../x", "./m", "/abs/m", "model"] {
            assert_eq!(repo_id(path), None, "{path}");
        }
    }
}

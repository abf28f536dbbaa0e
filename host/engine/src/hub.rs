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

/// Whether downloading is off for this process (`--offline`, `HF_HUB_OFFLINE`).
pub fn offline() -> bool {
    access().offline
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
        "{name} is not in the local Hugging Face cache ({cache}, which {what}) and downloading \
         is off (--offline or HF_HUB_OFFLINE): download it once online, or give a folder"
    )]
    Offline {
        name: String,
        cache: String,
        what: &'static str,
    },
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

/// Downloads repo id `name` into the local cache when it is no path and the cache lacks it (or
/// holds it incomplete, as an interrupted download leaves it), if downloading is allowed; then
/// `name` as a model path (see [`model_path`]).
pub fn fetched_model_path(base: &Path, name: &str) -> Result<PathBuf, HubError> {
    fetch_if_missing(base, name)?;
    Ok(model_path(base, name))
}

/// [`fetched_model_path`]'s download alone.
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
    let cached = resolve_in(name, &cache);
    if cached.as_deref().is_some_and(complete) {
        return Ok(());
    }
    let access = access();
    if access.offline {
        return Err(HubError::Offline {
            name: name.to_string(),
            cache: cache.display().to_string(),
            what: if cached.is_some() {
                "holds only part of it"
            } else {
                "does not hold it"
            },
        });
    }
    download(name, &cache, &access)
}

/// Folders of a pipeline Ferrite never reads.
const SKIPPED: [&str; 2] = ["safety_checker", "feature_extractor"];

/// The components `model_index.json` names (those with a class; a `[null, null]` entry is an
/// absent one).
fn components(model_index: &str) -> Vec<String> {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str(model_index) else {
        return Vec::new();
    };
    m.into_iter()
        .filter(|(k, v)| {
            !k.starts_with('_')
                && !SKIPPED.contains(&k.as_str())
                && v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null()))
        })
        .map(|(k, _)| k)
        .collect()
}

/// Whether a snapshot holds each component's files: its folder, with weights where it has a
/// `config.json` (a model, not a scheduler or tokenizer).
fn complete(snapshot: &Path) -> bool {
    let Ok(index) = std::fs::read_to_string(snapshot.join("model_index.json")) else {
        return false;
    };
    components(&index).iter().all(|c| {
        let names: Vec<String> = std::fs::read_dir(snapshot.join(c))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let weights = names
            .iter()
            .any(|n| n.ends_with(".safetensors") || n.ends_with(".bin"));
        !names.is_empty() && (weights || !names.iter().any(|n| n == "config.json"))
    })
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
    let mut builder = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_endpoint(endpoint.clone())
        .with_progress(true)
        .with_retries(3);
    // Else hf-hub's own: the token `huggingface-cli login` saved.
    if let Some(t) = &access.token {
        builder = builder.with_token(Some(t.clone()));
    }
    let api = builder.build().map_err(|e| fail(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        format!("{org}/{model}"),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = repo.info().map_err(|e| fail(e.to_string()))?;
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    if !listed.contains(&"model_index.json") {
        return Err(fail(
            "the repo has no model_index.json: it is not a diffusers pipeline (give a \
             checkpoint file's path instead)"
                .into(),
        ));
    }
    let index = repo
        .get("model_index.json")
        .map_err(|e| fail(format!("model_index.json: {e}")))?;
    let index = std::fs::read_to_string(&index).map_err(|e| fail(e.to_string()))?;
    for f in pipeline_files(listed.into_iter(), &components(&index)) {
        // Cached files are not fetched again; an interrupted one resumes.
        repo.get(&f).map_err(|e| fail(format!("{f}: {e}")))?;
    }
    resolve_in(name, cache)
        .filter(|s| complete(s))
        .map(|_| ())
        .ok_or_else(|| fail("the download left no complete snapshot in the cache".into()))
}

/// Weight variants diffusers keeps beside the plain files (`model.fp16.safetensors`).
const VARIANTS: [&str; 5] = [".fp16.", ".bf16.", ".fp32.", ".ema.", ".non_ema."];

/// The files of a pipeline repo that a model is read from: `model_index.json` and, in each
/// component folder it names, the configs, tokenizer files and weights — safetensors over
/// `.bin`, plain over variants (a variant only when nothing else is there) — but not the
/// single-file checkpoints beside them, other folders, nor the safety checker.
pub fn pipeline_files<'a>(
    files: impl Iterator<Item = &'a str>,
    components: &[String],
) -> Vec<String> {
    let files: Vec<&str> = files.collect();
    let mut out = vec!["model_index.json".to_string()];
    let mut folders: Vec<&str> = components
        .iter()
        .map(String::as_str)
        .filter(|c| !SKIPPED.contains(c))
        .collect();
    folders.sort();
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
        let file_name = |f: &str| f.rsplit('/').next().unwrap_or(f).to_string();
        // A weights file (diffusers' names only: not an exporter's `openvino_model.bin`), or a
        // sharded one's index.
        let is_weights = |f: &str| {
            let n = file_name(f);
            n.ends_with(".safetensors")
                || n.ends_with(".safetensors.index.json")
                || ((n.starts_with("diffusion_pytorch_model") || n.starts_with("pytorch_model"))
                    && (n.ends_with(".bin") || n.ends_with(".bin.index.json")))
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
            let other = !is_weights(f)
                && !f.ends_with(".bin")
                && [".json", ".txt", ".model"].iter().any(|e| f.ends_with(e));
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
        let named: Vec<String> = [
            "scheduler",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "transformer",
            "unet",
            "vae",
            "safety_checker",
        ]
        .map(String::from)
        .to_vec();
        let got = pipeline_files(repo.into_iter(), &named);
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
        // SDXL's repo: a second VAE and exporters' folders beside the components.
        let sdxl = [
            "model_index.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae_1_0/config.json",
            "vae_1_0/diffusion_pytorch_model.safetensors",
            "vae_decoder/config.json",
            "vae_decoder/openvino_model.bin",
        ];
        assert_eq!(
            pipeline_files(sdxl.into_iter(), &["vae".to_string()]),
            [
                "model_index.json",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"
            ]
        );
        let index = r#"{"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "image_encoder": [null, null]}"#;
        assert_eq!(components(index), ["unet"]);
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

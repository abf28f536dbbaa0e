//! Hugging Face repo ids as models (`runwayml/stable-diffusion-v1-5`, `org/name@revision`):
//! resolved to the snapshot the local Hugging Face cache holds, as diffusers leaves it
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! `models--org--name/refs/<revision>` naming `snapshots/<commit>`). Nothing is downloaded.

use std::path::{Path, PathBuf};

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

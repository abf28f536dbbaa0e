//! Hugging Face repo ids the local cache lacks are downloaded (hf-hub) from a local server
//! standing in for the hub (`HF_ENDPOINT`): only the pipeline's files, with the token, resuming a
//! partial file; the model then samples as its folder does, offline too; `--offline` never
//! touches the network; a repo the hub lacks is an error naming it.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A request the server saw: its path, its Range and Authorization headers.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

/// A content tag for `bytes` (hex, as the hub's).
fn etag(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), bytes.len())
}

/// Serves `files` as repo `org/tiny` at revision `main` until the process ends.
fn serve(files: BTreeMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (log, files) = (seen.clone(), Arc::new(files));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (log, files) = (log.clone(), files.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let (mut range, mut auth) = (None, None);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                    match k.trim().to_ascii_lowercase().as_str() {
                        "range" => range = Some(v.trim().to_string()),
                        "authorization" => auth = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
                log.lock().unwrap().push(Seen {
                    path: path.clone(),
                    range: range.clone(),
                    auth,
                });
                let reply = |status: &str, headers: &[(String, String)], body: &[u8]| {
                    let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                    for (k, v) in headers {
                        r.push_str(&format!("{k}: {v}\r\n"));
                    }
                    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                    let mut bytes = r.into_bytes();
                    bytes.extend_from_slice(body);
                    bytes
                };
                let response = if path == "/api/models/org/tiny/revision/main" {
                    let siblings: Vec<String> = files
                        .keys()
                        .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
                        .collect();
                    let json = format!(
                        "{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
                        siblings.join(",")
                    );
                    reply(
                        "200 OK",
                        &[("Content-Type".into(), "application/json".into())],
                        json.as_bytes(),
                    )
                } else if let Some(bytes) = path
                    .strip_prefix("/org/tiny/resolve/main/")
                    .and_then(|f| files.get(f))
                {
                    let from: usize = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.split('-').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let to = if range.as_deref() == Some("bytes=0-0") {
                        1
                    } else {
                        bytes.len()
                    };
                    let body = &bytes[from.min(bytes.len())..to.min(bytes.len())];
                    let headers = [
                        ("ETag".into(), format!("\"{}\"", etag(bytes))),
                        ("X-Repo-Commit".into(), COMMIT.into()),
                        (
                            "Content-Range".into(),
                            format!("bytes {from}-{}/{}", to.saturating_sub(1), bytes.len()),
                        ),
                    ];
                    reply("206 Partial Content", &headers, body)
                } else {
                    reply("404 Not Found", &[], b"Repository not found")
                };
                let _ = stream.write_all(&response);
            });
        }
    });
    (endpoint, seen)
}

/// The tiny pipeline's files, and two the download must leave alone: a single-file checkpoint
/// and an fp16 variant of the UNet.
fn repo_files() -> BTreeMap<String, Vec<u8>> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let mut files = BTreeMap::new();
    for dir in ["", "unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        for e in std::fs::read_dir(folder.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let name = p
                    .strip_prefix(&folder)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    files.insert("v1-5-pruned.ckpt".into(), vec![7; 4096]);
    files.insert(
        "unet/diffusion_pytorch_model.fp16.safetensors".into(),
        vec![8; 4096],
    );
    files
}

fn ferrite(root: &Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new(ferrite_tests::ferrite_bin())
        .args(args)
        .env("XDG_CONFIG_HOME", root)
        .env("HF_HUB_CACHE", root.join("cache"))
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", "test-token")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("FERRITE_PLUGIN_PATH")
        .output()
        .unwrap()
}

fn sample_args(model: &str, out: &Path) -> Vec<String> {
    let noise = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/noise.safetensors");
    [
        "sample",
        "--prompt",
        "a photo of a red cat",
        "--steps",
        "2",
        "--cfg",
        "4",
        "--width",
        "16",
        "--height",
        "16",
        "--init-noise",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        noise.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--model".into(),
        model.into(),
    ])
    .collect()
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_repo_id_is_downloaded_into_the_cache_and_samples_as_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let files = repo_files();
    let unet = files["unet/diffusion_pytorch_model.safetensors"].clone();
    let (endpoint, seen) = serve(files);

    // A download cut off halfway through the UNet's weights, as hf-hub leaves it.
    let blobs = root.join("cache/models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = unet.len() / 2;
    std::fs::write(blobs.join(format!("{}.part", etag(&unet))), &unet[..half]).unwrap();

    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let want = root.join("folder.png");
    let args = sample_args(folder.to_str().unwrap(), &want);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ferrite(root, &endpoint, &args);
    assert!(o.status.success(), "{}", said(&o));

    let got = root.join("hub.png");
    let args = sample_args("org/tiny", &got);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ferrite(root, &endpoint, &args);
    assert!(o.status.success(), "{}", said(&o));
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(&want).unwrap(),
        "the downloaded model samples as its folder"
    );
    let log = seen.lock().unwrap().clone();
    assert!(!log.is_empty());
    let paths: Vec<&str> = log.iter().map(|s| s.path.as_str()).collect();
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with(".ckpt") || p.contains(".fp16.")),
        "only the pipeline's files: {paths:?}"
    );
    assert!(
        log.iter()
            .all(|s| s.auth.as_deref() == Some("Bearer test-token")),
        "the token goes with every request"
    );
    assert!(
        log.iter().any(
            |s| s.path.ends_with("unet/diffusion_pytorch_model.safetensors")
                && s.range.as_deref() == Some(&format!("bytes={half}-"))
        ),
        "the partial file resumes: {log:?}"
    );
    let snapshot = root.join("cache/models--org--tiny/snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snapshot.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet
    );

    // Cached now: offline, against a hub that is not there, it samples the same.
    let again = root.join("again.png");
    let args = sample_args("org/tiny", &again);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.insert(0, "--offline");
    let o = ferrite(root, "http://127.0.0.1:9", &args);
    assert!(o.status.success(), "{}", said(&o));
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&want).unwrap()
    );

    // A download cut off between files leaves a snapshot without the UNet's weights: offline
    // that is said; online the rest is fetched.
    std::fs::remove_file(snapshot.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let o = ferrite(root, "http://127.0.0.1:9", &args);
    assert!(!o.status.success());
    assert!(said(&o).contains("holds only part of it"), "{}", said(&o));
    let before = seen.lock().unwrap().len();
    let online: Vec<&str> = args[1..].to_vec();
    let o = ferrite(root, &endpoint, &online);
    assert!(o.status.success(), "{}", said(&o));
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&want).unwrap()
    );
    let fetched: Vec<String> = seen.lock().unwrap()[before..]
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(
        fetched
            .iter()
            .any(|p| p.ends_with("unet/diffusion_pytorch_model.safetensors")),
        "{fetched:?}"
    );
}

#[test]
fn offline_or_unknown_repos_fail_naming_the_repo() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (endpoint, seen) = serve(repo_files());
    let out = root.join("x.png");

    let args = sample_args("org/tiny", &out);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.insert(0, "--offline");
    let o = ferrite(root, &endpoint, &args);
    assert!(!o.status.success());
    assert!(
        said(&o).contains("org/tiny is not in the local Hugging Face cache"),
        "{}",
        said(&o)
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "offline touches no network"
    );

    let args = sample_args("org/missing", &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ferrite(root, &endpoint, &args);
    let text = said(&o);
    assert!(!o.status.success());
    assert!(
        text.contains(&format!("downloading org/missing from {endpoint}")),
        "{text}"
    );
    assert!(text.contains("404"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

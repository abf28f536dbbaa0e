//! PyTorch's checkpoints (`.ckpt`, `.pt`, `.bin`) read without running anything: the tiny
//! SD 1.5 checkpoint saved by `torch.save` (tests/fixtures/gen/legacy_ckpt.py; a strided view and
//! a tensor at an offset in a shared storage), in the zip format and in the format before torch
//! 1.6, reads as its safetensors twin; a pickle that would run a command is refused naming the
//! global, and the command does not run; truncated, garbage and foreign files fail with a message
//! naming the file.

use std::io::Write;
use std::path::{Path, PathBuf};

use ferrite_plugin_api::{DType, Weights};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn open_err(path: &Path) -> String {
    match Weights::open(path.to_str().unwrap()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

/// A torch-style zip (`archive/data.pkl`, stored) holding `pickle`.
fn zip_with(path: &Path, pickle: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(pickle).unwrap();
    z.finish().unwrap();
}

#[test]
fn a_ckpt_reads_as_its_safetensors_twin_in_either_format() {
    ferrite::runtime::init("cpu").unwrap();
    let open = |p: &str| Weights::open(fixtures().join(p).to_str().unwrap()).unwrap();
    let twin = open("pipeline/sd15_tiny_ldm.safetensors");
    for file in [
        "legacy/sd15_tiny_ldm.ckpt",
        "legacy/sd15_tiny_ldm_before_1_6.ckpt",
    ] {
        let ckpt = open(file);
        assert_eq!(ckpt.infos(), twin.infos(), "{file}");
        for i in twin.infos() {
            let a = ckpt.get(&i.key, DType::F32).unwrap().to_vec().unwrap();
            let b = twin.get(&i.key, DType::F32).unwrap().to_vec().unwrap();
            assert!(a == b, "{file}: {}", i.key);
        }
    }
}

#[test]
fn a_pickle_that_runs_a_command_is_refused_and_runs_nothing() {
    ferrite::runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let shell = format!("touch {}", marker.display());
    let python = format!("__import__('os').system('touch {}')", marker.display());
    for (module, name, command) in [
        ("posix", "system", &shell),
        ("os", "system", &shell),
        ("builtins", "exec", &python),
    ] {
        // f(command) in protocol 2: GLOBAL, BINUNICODE, TUPLE1, REDUCE, STOP.
        let mut p = vec![0x80, 0x02, b'c'];
        p.extend(format!("{module}\n{name}\n").bytes());
        p.push(b'X');
        p.extend((command.len() as u32).to_le_bytes());
        p.extend(command.as_bytes());
        p.extend([0x85, b'R', b'.']);
        let path = dir.path().join(format!("{module}.ckpt"));
        zip_with(&path, &p);
        let e = open_err(&path);
        assert!(
            e.contains(&format!("`{module}.{name}`")) && e.contains(path.to_str().unwrap()),
            "{e}"
        );
    }
    // Protocol 4's STACK_GLOBAL names the global from two strings.
    let mut p = vec![0x80, 0x04, 0x8c, 5];
    p.extend(b"posix");
    p.extend([0x8c, 6]);
    p.extend(b"system");
    p.push(0x93);
    p.push(b'X');
    p.extend((shell.len() as u32).to_le_bytes());
    p.extend(shell.as_bytes());
    p.extend([0x85, b'R', b'.']);
    let path = dir.path().join("stack_global.ckpt");
    zip_with(&path, &p);
    assert!(open_err(&path).contains("`posix.system`"));
    assert!(!marker.exists(), "the command ran");
}

/// The first block of a tar archive holding `storages` (torch 0.x's checkpoints).
fn tar_header() -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    b[..8].copy_from_slice(b"storages");
    b[257..263].copy_from_slice(b"ustar\0");
    b
}

#[test]
fn broken_and_foreign_files_fail_naming_the_file() {
    ferrite::runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = std::fs::read(fixtures().join("legacy/sd15_tiny_ldm.ckpt")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.ckpt", ckpt[..ckpt.len() / 2].to_vec(), "zip"),
        (
            "garbage.ckpt",
            b"not a checkpoint at all".repeat(10),
            "safetensors",
        ),
        (
            "pickle.ckpt",
            vec![0x80, 0x02, b'c', b'x'],
            "a pickle, not a PyTorch checkpoint",
        ),
        ("empty.ckpt", Vec::new(), "safetensors"),
        ("tar.ckpt", tar_header(), "tar archive"),
    ];
    for (name, bytes, what) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = open_err(&path);
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains(what),
            "{name}: {e}"
        );
    }
    // A zip that is not a torch checkpoint, and a pickle cut short.
    let other = dir.path().join("other.zip");
    let f = std::fs::File::create(&other).unwrap();
    let mut z = zip::ZipWriter::new(f);
    z.start_file("readme.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    z.write_all(b"hello").unwrap();
    z.finish().unwrap();
    assert!(open_err(&other).contains("data.pkl"));
    let cut = dir.path().join("cut.ckpt");
    zip_with(&cut, b"\x80\x02}q\x00(X\xff\x00\x00\x00ab");
    assert!(open_err(&cut).contains("ends inside"));
    // The format before 1.6 cut in its pickles and in its storages.
    let old = std::fs::read(fixtures().join("legacy/sd15_tiny_ldm_before_1_6.ckpt")).unwrap();
    for (name, len, what) in [
        ("old_cut_pickle.ckpt", 200, "its object"),
        (
            "old_cut_storage.ckpt",
            old.len() - 10,
            "runs past the end of the file",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &old[..len]).unwrap();
        let e = open_err(&path);
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains(what),
            "{name}: {e}"
        );
    }
}

/// A PyTorch Lightning checkpoint: its `state_dict`'s tensors (f32 and f16), with a callback
/// object, a numpy scalar, a set and bytes beside them read as data, nothing run.
#[test]
fn a_lightning_checkpoint_gives_its_state_dict() {
    ferrite::runtime::init("cpu").unwrap();
    let w = Weights::open(fixtures().join("legacy/lightning.ckpt").to_str().unwrap()).unwrap();
    let infos: Vec<(String, DType, Vec<u64>)> = w
        .infos()
        .iter()
        .map(|i| (i.key.clone(), i.dtype, i.shape.clone()))
        .collect();
    assert_eq!(
        infos,
        [
            ("a.weight".to_string(), DType::F32, vec![3, 2]),
            ("b.bias".to_string(), DType::F16, vec![4]),
        ]
    );
    let b = w.get("b.bias", DType::F32).unwrap().to_vec().unwrap();
    assert!(b.iter().all(|v| v.is_finite() && *v != 0.0), "{b:?}");
}

//! `ferrite video frames|clips` on videos made here with ffmpeg from known frames (lossless, so
//! a kept frame can be compared pixel for pixel): which frames are kept, the blur filter, the
//! cap, clip lengths, a folder with a broken video in it, and bad input named.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferrite_tests::run_ferrite;

const W: u32 = 32;
const H: u32 = 24;
const FPS: u32 = 10;

/// Frame `i`: grey level 4·i; even frames carry a checkerboard (sharp), odd ones are flat
/// (no detail at all, so "blurry").
fn frame(i: u32) -> image::RgbImage {
    let g = (4 * i) as u8;
    image::RgbImage::from_fn(W, H, |x, y| {
        let v = if i.is_multiple_of(2) && (x + y).is_multiple_of(2) {
            g + 100
        } else {
            g
        };
        image::Rgb([v, v, v])
    })
}

/// `n` frames at 10 fps, stored losslessly (PNG in Matroska).
fn make_video(path: &Path, n: u32) {
    let mut ffmpeg = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{W}x{H}"), "-r", &FPS.to_string(), "-i", "-"])
        .args(["-c:v", "png"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("ffmpeg must be installed for these tests (.ci/run installs it)");
    let mut stdin = ffmpeg.stdin.take().unwrap();
    for i in 0..n {
        stdin.write_all(frame(i).as_raw()).unwrap();
    }
    drop(stdin);
    assert!(ffmpeg.wait().unwrap().success());
}

fn frames_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn said(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn frames(root: &Path, input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "video",
        "frames",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    run_ferrite(&args, None, root)
}

/// The written frames are exactly source frames `want`.
fn assert_frames(dir: &Path, want: &[u32]) {
    let got = frames_in(dir);
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (path, &i) in got.iter().zip(want) {
        let img = image::open(path).unwrap().to_rgb8();
        assert!(img == frame(i), "{} is not frame {i}", path.display());
    }
}

#[test]
fn frames_are_kept_every_n_frames_or_seconds_sharp_ones_only_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let video = root.join("clip.mkv");
    make_video(&video, 30);

    let o = frames(root, &video, &root.join("every5"), &["--every-frames", "5"]);
    assert!(o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("6 frames written to"), "{}", said(&o));
    assert_frames(&root.join("every5"), &[0, 5, 10, 15, 20, 25]);
    assert!(root.join("every5/clip-00001.png").is_file());

    let o = frames(
        root,
        &video,
        &root.join("every1s"),
        &["--every-seconds", "1"],
    );
    assert!(o.status.success(), "{}", said(&o));
    assert_frames(&root.join("every1s"), &[0, 10, 20]);

    // Every frame offered; the flat (odd) ones fall below the sharpness floor.
    let o = frames(
        root,
        &video,
        &root.join("sharp"),
        &["--every-frames", "1", "--min-sharpness", "100"],
    );
    assert!(o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("15 left out as blurry"), "{}", said(&o));
    assert_frames(&root.join("sharp"), &(0..30).step_by(2).collect::<Vec<_>>());

    let o = frames(
        root,
        &video,
        &root.join("max"),
        &["--every-frames", "3", "--max", "4"],
    );
    assert!(o.status.success(), "{}", said(&o));
    assert_frames(&root.join("max"), &[0, 3, 6, 9]);

    // Run again into the same folder: nothing is overwritten.
    let o = frames(
        root,
        &video,
        &root.join("max"),
        &["--every-frames", "3", "--max", "4"],
    );
    assert!(!o.status.success());
    assert!(
        said(&o).contains("clip-00001.png already exists"),
        "{}",
        said(&o)
    );
}

#[test]
fn a_folder_of_videos_mirrors_its_subfolders_and_skips_a_broken_video() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let videos = root.join("videos");
    std::fs::create_dir_all(videos.join("holiday")).unwrap();
    make_video(&videos.join("a.mkv"), 10);
    make_video(&videos.join("holiday/b.mkv"), 20);
    std::fs::write(videos.join("broken.mp4"), b"not a video at all").unwrap();
    std::fs::write(videos.join("notes.txt"), b"not a video either").unwrap();

    let out = root.join("frames");
    let o = frames(root, &videos, &out, &["--every-seconds", "1"]);
    let text = said(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("skipped") && text.contains("broken.mp4"),
        "{text}"
    );
    assert!(
        text.contains("3 frames written to") && text.contains("from 2 of 3 videos"),
        "{text}"
    );
    assert_frames(&out.join("holiday"), &[0, 10]);
    assert!(out.join("a-00001.png").is_file());

    // A single broken video is an error naming it.
    let o = frames(root, &videos.join("broken.mp4"), &root.join("x"), &[]);
    assert!(!o.status.success());
    assert!(
        said(&o).contains("broken.mp4: ffmpeg could not read it"),
        "{}",
        said(&o)
    );
}

#[test]
fn clips_are_cut_to_length() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let video = root.join("long.mkv");
    make_video(&video, 30);
    let out = root.join("clips");
    let o = run_ferrite(
        &[
            "video",
            "clips",
            "--input",
            video.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--clip-seconds",
            "1",
        ],
        None,
        root,
    );
    assert!(o.status.success(), "{}", said(&o));
    let clips = frames_in(&out);
    let names: Vec<_> = clips
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["long-0001.mp4", "long-0002.mp4", "long-0003.mp4"]);
    // Each clip holds one second: ten frames.
    for clip in &clips {
        let each = root.join("of").join(clip.file_stem().unwrap());
        let o = frames(root, clip, &each, &["--every-frames", "1"]);
        assert!(o.status.success(), "{}", said(&o));
        assert_eq!(frames_in(&each).len(), 10, "{}", clip.display());
    }
}

#[test]
fn bad_input_is_named_and_a_missing_ffmpeg_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let o = frames(root, &root.join("nothing.mp4"), &root.join("out"), &[]);
    assert!(!o.status.success());
    assert!(
        said(&o).contains("nothing.mp4: no such file or folder"),
        "{}",
        said(&o)
    );

    std::fs::create_dir_all(root.join("empty")).unwrap();
    let o = frames(root, &root.join("empty"), &root.join("out"), &[]);
    assert!(said(&o).contains("no video files in it"), "{}", said(&o));

    let video = root.join("v.mkv");
    make_video(&video, 2);
    let o = frames(root, &video, &root.join("out"), &["--every-frames", "0"]);
    assert!(
        said(&o).contains("--every-frames must be at least 1"),
        "{}",
        said(&o)
    );

    let o = Command::new(ferrite_tests::ferrite_bin())
        .args(["video", "frames", "--input"])
        .arg(&video)
        .arg("--output")
        .arg(root.join("out"))
        .env("FERRITE_FFMPEG", root.join("no-ffmpeg-here"))
        .env("XDG_CONFIG_HOME", root)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = said(&o);
    assert!(
        text.contains("was not found") && text.contains("apt install ffmpeg"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

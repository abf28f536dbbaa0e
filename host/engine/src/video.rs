//! The video tool (OneTrainer's Video Tools): still frames and short clips cut from videos for a
//! dataset, through the system's `ffmpeg` (decoding every container and codec users have is
//! ffmpeg's job; linking it would tie the binary to one FFmpeg build).
//!
//! Frames come out of ffmpeg as a PPM stream on a pipe — each frame carries its own size, so
//! rotated phone videos need no probe — and are written here as PNGs, atomically. Clips are cut
//! by ffmpeg's segment muxer into a scratch folder beside the output and renamed into place.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use image::{ImageBuffer, Rgb};

use crate::fsutil::write_atomic;

/// Containers the tool looks for in a folder (OneTrainer's list, plus a few common ones).
pub const VIDEO_EXTENSIONS: [&str; 12] = [
    "mp4", "mkv", "mov", "avi", "webm", "m4v", "wmv", "flv", "mpg", "mpeg", "ts", "gif",
];

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error(
        "`{0}` was not found: the video tool runs the system's ffmpeg. Install it (Debian/Ubuntu: \
         `apt install ffmpeg`, macOS: `brew install ffmpeg`, Windows: ffmpeg.org) and make sure \
         it is on PATH"
    )]
    FfmpegMissing(String),
    #[error("{0}: no such file or folder")]
    NoInput(PathBuf),
    #[error("{0}: no video files in it (looked for {exts})", exts = VIDEO_EXTENSIONS.join(", "))]
    NoVideos(PathBuf),
    #[error("{0}: ffmpeg could not read it: {1}")]
    Unreadable(PathBuf, String),
    #[error("{0} already exists; choose another --output or move it away (nothing is overwritten)")]
    Exists(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("{0}")]
    Option(String),
}

type Result<T> = std::result::Result<T, VideoError>;

/// A video and the folder its outputs go to.
pub type Job = (PathBuf, PathBuf);

/// Which frames to keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Every {
    /// The first frame, then the first frame at least this many seconds after the last kept one.
    Seconds(f64),
    /// Frames 0, N, 2N, …
    Frames(u64),
}

#[derive(Clone, Debug)]
pub struct FrameOptions {
    pub every: Every,
    /// At most this many frames from each video.
    pub max: Option<usize>,
    /// Frames whose sharpness (the variance of the 3×3 Laplacian of their grey levels, on a
    /// 0–255 scale, as OpenCV's blur check measures it) is below this are not written.
    pub min_sharpness: Option<f64>,
}

/// What a run did, video by video.
#[derive(Debug, Default)]
pub struct Report {
    pub videos: usize,
    pub written: Vec<PathBuf>,
    /// Frames left out for being below `min_sharpness`.
    pub blurry: usize,
    /// Videos in a folder that ffmpeg could not read: reported and skipped.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Report {
    /// What a run did, as the CLI prints it and the app shows it: the count, the videos read,
    /// the frames left out and each video skipped with why.
    pub fn summary(&self, what: &str, output: &Path) -> String {
        let mut s = format!(
            "{} {what} written to {} from {} of {} videos",
            self.written.len(),
            output.display(),
            self.videos - self.skipped.len(),
            self.videos
        );
        if self.blurry > 0 {
            s.push_str(&format!(", {} left out as blurry", self.blurry));
        }
        for (p, why) in &self.skipped {
            s.push_str(&format!("\nskipped {}: {why}", p.display()));
        }
        s
    }

    /// Whether no video could be read at all (a failure, though each was only skipped).
    pub fn none_read(&self) -> bool {
        self.videos > 0 && self.skipped.len() == self.videos
    }
}

/// A line of progress: the video being worked on and how many files it has given so far.
pub struct Progress<'a> {
    pub video: &'a Path,
    pub index: usize,
    pub of: usize,
    pub written: usize,
}

fn ffmpeg_program() -> String {
    std::env::var("FERRITE_FFMPEG").unwrap_or_else(|_| "ffmpeg".into())
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => VideoError::FfmpegMissing(ffmpeg_program()),
        _ => VideoError::Io(PathBuf::from(ffmpeg_program()), e),
    })
}

/// Fails with the install hint when ffmpeg cannot be run.
pub fn check_ffmpeg() -> Result<()> {
    let out = spawn(
        Command::new(ffmpeg_program())
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?
    .wait();
    match out {
        Ok(s) if s.success() => Ok(()),
        _ => Err(VideoError::FfmpegMissing(ffmpeg_program())),
    }
}

/// The videos under `input` (itself when it is a file), in a stable order, each with the folder
/// its outputs go to: the output folder, or its mirror of the video's subfolder.
pub fn find_videos(input: &Path, output: &Path) -> Result<Vec<Job>> {
    if input.is_file() {
        return Ok(vec![(input.to_path_buf(), output.to_path_buf())]);
    }
    if !input.is_dir() {
        return Err(VideoError::NoInput(input.to_path_buf()));
    }
    let mut found = Vec::new();
    let mut dirs = vec![input.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| VideoError::Io(dir.clone(), e))?;
        for entry in entries {
            let path = entry.map_err(|e| VideoError::Io(dir.clone(), e))?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if is_video(&path) {
                let rel = path.parent().and_then(|p| p.strip_prefix(input).ok());
                found.push((path.clone(), output.join(rel.unwrap_or(Path::new("")))));
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(VideoError::NoVideos(input.to_path_buf()));
    }
    Ok(found)
}

fn is_video(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video".into())
}

/// ffmpeg's `select` expression for the frames to keep.
fn select(every: Every) -> String {
    match every {
        Every::Frames(n) => format!("select=not(mod(n\\,{n}))"),
        // A millisecond of slack, so that 0.5 s at 30 fps (15 frame steps summed in floating
        // point) does not slip to the next frame.
        Every::Seconds(s) => {
            format!(
                "select=isnan(prev_selected_t)+gte(t-prev_selected_t\\,{})",
                s - 0.001
            )
        }
    }
}

fn check_every(every: Every) -> Result<()> {
    match every {
        Every::Frames(0) => Err(VideoError::Option(
            "--every-frames must be at least 1".into(),
        )),
        Every::Seconds(s) if !(s.is_finite() && s > 0.0) => Err(VideoError::Option(format!(
            "--every-seconds must be a positive number of seconds, not {s}"
        ))),
        _ => Ok(()),
    }
}

/// A run's start: ffmpeg there, the videos with their output folders, whether `input` is one
/// video (then an unreadable one is an error, not a skip), and an empty report.
fn begin(input: &Path, output: &Path) -> Result<(Vec<Job>, bool, Report)> {
    check_ffmpeg()?;
    let videos = find_videos(input, output)?;
    let report = Report {
        videos: videos.len(),
        ..Report::default()
    };
    Ok((videos, input.is_file(), report))
}

/// Still frames from every video under `input`, as `<stem>-00001.png`, … in `output` (or its
/// mirror of the video's subfolder). A video in a folder that ffmpeg cannot read is reported and
/// skipped; a single unreadable video is an error.
pub fn extract_frames(
    input: &Path,
    output: &Path,
    options: &FrameOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report> {
    check_every(options.every)?;
    let (videos, single, mut report) = begin(input, output)?;
    for (index, (video, dir)) in videos.iter().enumerate() {
        let before = report.written.len();
        let got = frames_of(video, dir, options, &mut report, &mut |written| {
            progress(Progress {
                video,
                index,
                of: videos.len(),
                written,
            })
        });
        match got {
            Err(VideoError::Unreadable(p, why)) if !single && report.written.len() == before => {
                report.skipped.push((p, why))
            }
            other => other?,
        }
    }
    Ok(report)
}

fn frames_of(
    video: &Path,
    dir: &Path,
    options: &FrameOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(usize),
) -> Result<()> {
    let mut child = spawn(
        Command::new(ffmpeg_program())
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(video)
            .args([
                "-an",
                "-vf",
                &select(options.every),
                "-vsync",
                "passthrough",
            ])
            .args(["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "-"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let mut frames = BufReader::new(child.stdout.take().expect("piped"));
    let stem = stem(video);
    let mut kept = 0usize;
    let mut result = Ok(());
    loop {
        if options.max.is_some_and(|m| kept >= m) {
            break;
        }
        let frame = match read_ppm(&mut frames) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                result = Err(VideoError::Unreadable(video.to_path_buf(), e.to_string()));
                break;
            }
        };
        if let Some(min) = options.min_sharpness
            && sharpness(&frame) < min
        {
            report.blurry += 1;
            continue;
        }
        kept += 1;
        let path = dir.join(format!("{stem}-{kept:05}.png"));
        if let Err(e) = write_png(&path, &frame) {
            result = Err(e);
            break;
        }
        report.written.push(path);
        progress(kept);
    }
    drop(frames);
    // Stopping early (max reached, or an error here) leaves ffmpeg writing into a closed pipe:
    // it is stopped. At the stream's end it is left to finish on its own.
    let stopped_early = options.max.is_some_and(|m| kept >= m) || result.is_err();
    if stopped_early {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| VideoError::Io(video.to_path_buf(), e))?;
    let errors = errors.join().unwrap_or_default();
    result?;
    if !status.success() && !stopped_early {
        return Err(VideoError::Unreadable(
            video.to_path_buf(),
            last_line(video, &errors),
        ));
    }
    Ok(())
}

/// ffmpeg's last message about `video`, without the file name it starts with.
fn last_line(video: &Path, s: &str) -> String {
    let line = s
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("ffmpeg failed without a message")
        .trim();
    let prefix = format!("{}: ", video.display());
    line.strip_prefix(&prefix).unwrap_or(line).to_string()
}

fn write_png(path: &Path, frame: &ImageBuffer<Rgb<u8>, Vec<u8>>) -> Result<()> {
    if path.exists() {
        return Err(VideoError::Exists(path.to_path_buf()));
    }
    let mut bytes = Vec::new();
    frame
        .write_to(&mut io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| VideoError::Io(path.to_path_buf(), io::Error::other(e)))?;
    write_atomic(path, &bytes).map_err(|e| VideoError::Io(path.to_path_buf(), e))
}

/// One binary PPM (P6, 8-bit) from the stream; `None` at its end.
fn read_ppm(r: &mut impl BufRead) -> io::Result<Option<ImageBuffer<Rgb<u8>, Vec<u8>>>> {
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("frame stream: {what}"));
    // Header: magic, width, height, maxval, each followed by whitespace.
    let mut fields = Vec::with_capacity(4);
    while fields.len() < 4 {
        let mut token = Vec::new();
        loop {
            let mut b = [0u8];
            r.read_exact(&mut b)?;
            if b[0].is_ascii_whitespace() {
                if !token.is_empty() {
                    break;
                }
            } else if token.len() < 16 {
                token.push(b[0]);
            } else {
                return Err(bad("a header field longer than 16 bytes"));
            }
        }
        fields.push(String::from_utf8_lossy(&token).into_owned());
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(bad("not an 8-bit binary PPM"));
    }
    let dim = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|&d| (1..=1 << 15).contains(&d))
    };
    let (Some(w), Some(h)) = (dim(&fields[1]), dim(&fields[2])) else {
        return Err(bad("a frame size out of range"));
    };
    let mut data = vec![0u8; w as usize * h as usize * 3];
    r.read_exact(&mut data)?;
    Ok(ImageBuffer::from_raw(w, h, data))
}

/// The variance of the 3×3 Laplacian (4-neighbour) of the frame's grey levels (ITU-R 601 luma,
/// as OpenCV's `COLOR_RGB2GRAY`) over its interior: low for blurred frames.
pub fn sharpness(frame: &ImageBuffer<Rgb<u8>, Vec<u8>>) -> f64 {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if w < 3 || h < 3 {
        return 0.0;
    }
    let grey: Vec<f64> = frame
        .pixels()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let (mut sum, mut sum_sq, mut n) = (0.0, 0.0, 0.0);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let i = y * w + x;
            let l = grey[i - 1] + grey[i + 1] + grey[i - w] + grey[i + w] - 4.0 * grey[i];
            sum += l;
            sum_sq += l * l;
            n += 1.0;
        }
    }
    let mean = sum / n;
    sum_sq / n - mean * mean
}

/// Cuts every video under `input` into clips of `clip_seconds` (the last may be shorter), as
/// `<stem>-0001.mp4`, … (H.264, no sound). Cuts are exact: a key frame is forced at each one.
pub fn extract_clips(
    input: &Path,
    output: &Path,
    clip_seconds: f64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report> {
    if !(clip_seconds.is_finite() && clip_seconds > 0.0) {
        return Err(VideoError::Option(format!(
            "--clip-seconds must be a positive number of seconds, not {clip_seconds}"
        )));
    }
    let (videos, single, mut report) = begin(input, output)?;
    for (index, (video, dir)) in videos.iter().enumerate() {
        match clips_of(video, dir, clip_seconds) {
            Ok(paths) => {
                report.written.extend(paths);
                progress(Progress {
                    video,
                    index,
                    of: videos.len(),
                    written: report.written.len(),
                });
            }
            Err(VideoError::Unreadable(p, why)) if !single => report.skipped.push((p, why)),
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

fn clips_of(video: &Path, dir: &Path, seconds: f64) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).map_err(|e| VideoError::Io(dir.to_path_buf(), e))?;
    // ffmpeg writes the clips itself, so into a scratch folder of ours; each finished clip is
    // synced and renamed into place.
    let scratch = tempfile::Builder::new()
        .prefix(".ferrite-clips-")
        .tempdir_in(dir)
        .map_err(|e| VideoError::Io(dir.to_path_buf(), e))?;
    let stem = stem(video);
    let pattern = scratch.path().join(format!("{stem}-%04d.mp4"));
    let out = spawn(
        Command::new(ffmpeg_program())
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(video)
            .args([
                "-an", "-map", "0:v:0", "-c:v", "libx264", "-preset", "veryfast",
            ])
            .args(["-crf", "18", "-pix_fmt", "yuv420p", "-force_key_frames"])
            .arg(format!("expr:gte(t,n_forced*{seconds})"))
            .args(["-f", "segment", "-segment_time"])
            .arg(seconds.to_string())
            .args(["-reset_timestamps", "1", "-segment_start_number", "1"])
            .arg(&pattern)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?
    .wait_with_output()
    .map_err(|e| VideoError::Io(video.to_path_buf(), e))?;
    if !out.status.success() {
        return Err(VideoError::Unreadable(
            video.to_path_buf(),
            last_line(video, &String::from_utf8_lossy(&out.stderr)),
        ));
    }
    let mut made: Vec<PathBuf> = fs::read_dir(scratch.path())
        .map_err(|e| VideoError::Io(scratch.path().to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    made.sort();
    if made.is_empty() {
        return Err(VideoError::Unreadable(
            video.to_path_buf(),
            "no video frames in it".into(),
        ));
    }
    let mut placed = Vec::with_capacity(made.len());
    for clip in made {
        let to = dir.join(clip.file_name().expect("a file"));
        if to.exists() {
            return Err(VideoError::Exists(to));
        }
        let sync = fs::File::open(&clip).and_then(|f| f.sync_all());
        sync.and_then(|()| fs::rename(&clip, &to))
            .map_err(|e| VideoError::Io(to.clone(), e))?;
        placed.push(to);
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VideoError::Io(dir.to_path_buf(), e))?;
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_frames_are_read_one_after_another_and_bad_headers_refused() {
        let mut stream = b"P6\n2 1\n255\n\x01\x02\x03\x04\x05\x06".to_vec();
        stream.extend_from_slice(b"P6 1 1 255 \x07\x08\x09");
        let mut r = io::Cursor::new(stream);
        let a = read_ppm(&mut r).unwrap().unwrap();
        assert_eq!((a.width(), a.height()), (2, 1));
        assert_eq!(a.as_raw(), &[1, 2, 3, 4, 5, 6]);
        let b = read_ppm(&mut r).unwrap().unwrap();
        assert_eq!(b.as_raw(), &[7, 8, 9]);
        assert!(read_ppm(&mut r).unwrap().is_none());
        for bad in [
            &b"P5\n1 1\n255\n\x00"[..],
            b"P6\n0 1\n255\n",
            b"P6\n1 1\n65535\n\0\0\0\0\0\0",
        ] {
            assert!(read_ppm(&mut io::Cursor::new(bad)).is_err());
        }
        // A frame cut short is an error, not a smaller frame.
        assert!(read_ppm(&mut io::Cursor::new(b"P6\n2 2\n255\n\x01")).is_err());
    }

    #[test]
    fn a_flat_frame_has_no_sharpness_and_a_checkerboard_a_known_one() {
        let flat = ImageBuffer::from_pixel(8, 8, Rgb([90u8, 90, 90]));
        assert_eq!(sharpness(&flat), 0.0);
        // Alternating 0/255 greys: every interior Laplacian is ±4·255, so the variance is
        // (4·255)² (the mean is ~0 over an even count).
        let board = ImageBuffer::from_fn(6, 6, |x, y| {
            let v = if (x + y) % 2 == 0 { 255u8 } else { 0 };
            Rgb([v, v, v])
        });
        let s = sharpness(&board);
        assert!((s - (4.0f64 * 255.0).powi(2)).abs() < 1e-6 * s, "{s}");
    }

    #[test]
    fn frame_steps_must_be_positive() {
        assert!(check_every(Every::Frames(0)).is_err());
        assert!(check_every(Every::Seconds(-1.0)).is_err());
        assert!(check_every(Every::Seconds(f64::NAN)).is_err());
    }
}

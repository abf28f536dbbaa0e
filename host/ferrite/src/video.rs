//! `ferrite video frames|clips`: the engine's video tool from the command line.

use std::path::PathBuf;

use anyhow::{Result, bail};
use ferrite::video::{self, Every, FrameOptions, Progress, Report};

#[derive(clap::Subcommand)]
pub enum VideoAction {
    /// Still frames from a video, or from every video in a folder and its subfolders, as PNGs.
    Frames {
        /// A video file or a folder of them.
        #[arg(long)]
        input: PathBuf,
        /// Where the frames go (a folder's subfolders are mirrored).
        #[arg(long)]
        output: PathBuf,
        /// Keep the first frame, then one every S seconds (default 1 when neither is given).
        #[arg(long, value_name = "S", conflicts_with = "every_frames")]
        every_seconds: Option<f64>,
        /// Keep frames 0, N, 2N, …
        #[arg(long, value_name = "N")]
        every_frames: Option<u64>,
        /// At most N frames from each video.
        #[arg(long, value_name = "N")]
        max: Option<usize>,
        /// Leave out frames blurrier than this: the variance of the frame's Laplacian, as
        /// OpenCV's blur check measures it (around 100 separates blurred from sharp photos).
        #[arg(long, value_name = "X")]
        min_sharpness: Option<f64>,
    },
    /// Clips of at most S seconds cut from a video, or from every video in a folder (H.264 .mp4,
    /// no sound).
    Clips {
        /// A video file or a folder of them.
        #[arg(long)]
        input: PathBuf,
        /// Where the clips go (a folder's subfolders are mirrored).
        #[arg(long)]
        output: PathBuf,
        /// Each clip's length in seconds; the last one of a video may be shorter.
        #[arg(long, value_name = "S", default_value_t = 3.0)]
        clip_seconds: f64,
    },
}

fn progress(p: Progress) {
    eprint!(
        "\r[{}/{}] {}: {} written   ",
        p.index + 1,
        p.of,
        p.video.display(),
        p.written
    );
}

fn summary(report: &Report, what: &str, output: &std::path::Path) -> Result<()> {
    eprintln!();
    println!("{}", report.summary(what, output));
    if report.none_read() {
        bail!("no video could be read");
    }
    Ok(())
}

pub fn run(action: VideoAction) -> Result<()> {
    match action {
        VideoAction::Frames {
            input,
            output,
            every_seconds,
            every_frames,
            max,
            min_sharpness,
        } => {
            let every = match (every_seconds, every_frames) {
                (_, Some(n)) => Every::Frames(n),
                (s, None) => Every::Seconds(s.unwrap_or(1.0)),
            };
            let options = FrameOptions {
                every,
                max,
                min_sharpness,
            };
            let report = video::extract_frames(&input, &output, &options, &mut progress)?;
            summary(&report, "frames", &output)
        }
        VideoAction::Clips {
            input,
            output,
            clip_seconds,
        } => {
            let report = video::extract_clips(&input, &output, clip_seconds, &mut progress)?;
            summary(&report, "clips", &output)
        }
    }
}

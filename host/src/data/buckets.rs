//! OneTrainer's aspect-ratio buckets: the aspect ratios 1:1, 1:1.25, 1:1.5, 1:1.75, 1:2, 1:2.5,
//! 1:3, 1:3.5, 1:4 and their transposes, each scaled to about `resolution²` pixels and rounded to
//! the model's step; an image goes to the bucket of the nearest aspect ratio.

/// Height/width ratios of the portrait buckets; landscape ones are their transposes.
const RATIOS: [f64; 9] = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0];

#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// (width, height), unique.
    pub sizes: Vec<(usize, usize)>,
}

fn round_to(v: f64, step: usize) -> usize {
    ((v / step as f64).round() as usize).max(1) * step
}

impl Buckets {
    /// Buckets for a square `resolution`; with `enabled` false, only the square one.
    pub fn new(resolution: (usize, usize), step: usize, enabled: bool) -> Self {
        let (rw, rh) = resolution;
        if !enabled || rw != rh {
            return Self {
                sizes: vec![(round_to(rw as f64, step), round_to(rh as f64, step))],
            };
        }
        let res = rw as f64;
        let mut sizes = Vec::new();
        for r in RATIOS {
            let (w, h) = (res / r.sqrt(), res * r.sqrt());
            for s in [
                (round_to(w, step), round_to(h, step)),
                (round_to(h, step), round_to(w, step)),
            ] {
                if !sizes.contains(&s) {
                    sizes.push(s);
                }
            }
        }
        Self { sizes }
    }

    /// The bucket whose aspect ratio is nearest the image's (in log space, so 1:2 and 2:1 are
    /// equally far from 1:1).
    pub fn nearest(&self, width: usize, height: usize) -> (usize, usize) {
        let a = (height as f64 / width as f64).ln();
        *self
            .sizes
            .iter()
            .min_by(|x, y| {
                let d = |s: &&(usize, usize)| ((s.1 as f64 / s.0 as f64).ln() - a).abs();
                d(x).total_cmp(&d(y))
            })
            .expect("at least one bucket")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_the_pixel_count_and_step() {
        let b = Buckets::new((512, 512), 8, true);
        assert_eq!(b.sizes.len(), 17, "9 ratios and 8 transposes");
        for &(w, h) in &b.sizes {
            assert!(w % 8 == 0 && h % 8 == 0);
            let px = (w * h) as f64 / (512.0 * 512.0);
            assert!((0.95..1.05).contains(&px), "{w}x{h}");
        }
        assert!(b.sizes.contains(&(512, 512)));
        assert!(b.sizes.contains(&(256, 1024)) && b.sizes.contains(&(1024, 256)));
        assert_eq!(b.nearest(1000, 1000), (512, 512));
        assert_eq!(b.nearest(400, 800), (360, 728));
        assert_eq!(b.nearest(800, 400), (728, 360));
        assert_eq!(Buckets::new((512, 512), 8, false).sizes, [(512, 512)]);
    }
}

//! OneTrainer's aspect-ratio buckets: the aspect ratios 1:1, 1:1.25, 1:1.5, 1:1.75, 1:2, 1:2.5,
//! 1:3, 1:3.5, 1:4 and their transposes, each scaled to about `resolution²` pixels and rounded to
//! the model's step (Python's round: half to even, as OneTrainer's mgds rounds); an image goes to
//! the bucket whose height/width is nearest its own (plain difference, as mgds compares).

/// Height/width ratios of the portrait buckets; landscape ones are their transposes.
const RATIOS: [f64; 9] = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0];

#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// (width, height), unique.
    pub sizes: Vec<(usize, usize)>,
}

fn round_to(v: f64, step: usize) -> usize {
    ((v / step as f64).round_ties_even() as usize).max(1) * step
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

    /// The bucket whose height/width is nearest the image's.
    pub fn nearest(&self, width: usize, height: usize) -> (usize, usize) {
        let a = height as f64 / width as f64;
        *self
            .sizes
            .iter()
            .min_by(|x, y| {
                let d = |s: &&(usize, usize)| (s.1 as f64 / s.0 as f64 - a).abs();
                d(x).total_cmp(&d(y))
            })
            .expect("at least one bucket")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values from tests/fixtures/gen/buckets.py (mgds' algorithm in Python).
    fn check(res: usize, step: usize, want: &[(usize, usize)], assigned: &[[usize; 4]]) {
        let b = Buckets::new((res, res), step, true);
        let mut got = b.sizes.clone();
        got.sort_by_key(|&(w, h)| (h, w));
        let mut want = want.to_vec();
        want.sort_by_key(|&(w, h)| (h, w));
        assert_eq!(got, want, "{res} step {step}");
        for &[w, h, bw, bh] in assigned {
            assert_eq!(b.nearest(w, h), (bw, bh), "{w}x{h} at {res} step {step}");
        }
    }

    #[test]
    fn onetrainers_buckets_and_assignments() {
        check(
            1024,
            64,
            &[
                (2048, 512),
                (1792, 576),
                (1920, 576),
                (1600, 640),
                (1472, 704),
                (1344, 768),
                (1280, 832),
                (1152, 896),
                (1024, 1024),
                (896, 1152),
                (832, 1280),
                (768, 1344),
                (704, 1472),
                (640, 1600),
                (576, 1792),
                (576, 1920),
                (512, 2048),
            ],
            &[
                [1000, 1000, 1024, 1024],
                [1920, 1080, 1344, 768],
                [1080, 1920, 768, 1344],
                [4000, 1000, 2048, 512],
                [3000, 2000, 1280, 832],
                [800, 1000, 896, 1152],
                [1234, 567, 1472, 704],
                [640, 2000, 576, 1792],
                [2500, 1000, 1600, 640],
                [100, 300, 576, 1792],
                [333, 777, 640, 1600],
                [500, 1200, 640, 1600],
            ],
        );
        check(
            512,
            8,
            &[
                (1024, 256),
                (960, 272),
                (888, 296),
                (808, 320),
                (728, 360),
                (680, 384),
                (624, 416),
                (576, 456),
                (512, 512),
                (456, 576),
                (416, 624),
                (384, 680),
                (360, 728),
                (320, 808),
                (296, 888),
                (272, 960),
                (256, 1024),
            ],
            &[
                [1000, 1000, 512, 512],
                [1920, 1080, 680, 384],
                [1080, 1920, 384, 680],
                [4000, 1000, 1024, 256],
                [3000, 2000, 624, 416],
                [800, 1000, 456, 576],
                [1234, 567, 728, 360],
                [640, 2000, 296, 888],
                [2500, 1000, 808, 320],
                [100, 300, 296, 888],
                [333, 777, 320, 808],
                [500, 1200, 320, 808],
            ],
        );
        assert_eq!(Buckets::new((512, 512), 8, false).sizes, [(512, 512)]);
    }
}

//! Training timesteps drawn as OneTrainer draws them: between `min_noising_strength` and
//! `max_noising_strength` of the schedule, from a continuous distribution (uniform, logit_normal,
//! heavy_tail) or from weights over the timesteps (sigmoid, cos_map, inverted_parabola), shifted
//! by `timestep_shift`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::{TimestepDistribution, TrainConfig};

pub struct Timesteps {
    kind: TimestepDistribution,
    /// The schedule's length.
    n: usize,
    lo: usize,
    hi: usize,
    weight: f64,
    bias: f64,
    shift: f64,
    /// Discrete distributions: cumulative weights over lo..hi (for `shift`).
    cumulative: Vec<f64>,
    /// `dynamic_timestep_shifting`: the shift of a batch of images of a size.
    dynamic: Option<Box<SizeShift>>,
}

/// The timestep shift for images of a size (width, height).
type SizeShift = dyn Fn((usize, usize)) -> f64 + Send + Sync;

/// The weights of a discrete distribution at evenly spaced points of [0, 1], moved by the
/// inverse shift and scaled by its derivative (the width of a shifted bucket); cumulated.
fn cumulative(
    kind: TimestepDistribution,
    count: usize,
    weight: f64,
    bias: f64,
    shift: f64,
) -> Vec<f64> {
    let x = |i: usize| i as f64 / (count.max(2) - 1) as f64;
    let shifted = |x: f64| x / (shift - shift * x + x);
    let derivative = |x: f64| shift / (shift + x - x * shift).powi(2);
    let weights: Option<Vec<f64>> = match kind {
        TimestepDistribution::CosMap => Some(
            (0..count)
                .map(|i| {
                    let s = shifted(x(i));
                    let pi = std::f64::consts::PI;
                    2.0 / (pi - 2.0 * pi * s + 2.0 * pi * s * s) * derivative(x(i))
                })
                .collect(),
        ),
        TimestepDistribution::Sigmoid => Some(
            (0..count)
                .map(|i| {
                    // OneTrainer applies the shift twice here; kept for the same draws.
                    let s = shifted(shifted(x(i)));
                    derivative(x(i)) / (1.0 + (-weight * (s - (bias + 0.5))).exp())
                })
                .collect(),
        ),
        TimestepDistribution::InvertedParabola => Some(
            (0..count)
                .map(|i| {
                    let s = shifted(x(i));
                    (-weight * (s - (bias + 0.5)).powi(2) + 2.0).max(0.0) * derivative(x(i))
                })
                .collect(),
        ),
        _ => None,
    };
    weights
        .map(|w| {
            w.iter()
                .scan(0.0, |acc, v| {
                    *acc += v;
                    Some(*acc)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Timesteps {
    pub fn new(c: &TrainConfig, n: usize) -> Self {
        let lo = (c.min_noising_strength * n as f64) as usize;
        let hi = ((c.max_noising_strength * n as f64) as usize).clamp(lo + 1, n.max(lo + 1));
        let (weight, bias, shift) = (c.noising_weight, c.noising_bias, c.timestep_shift);
        Self {
            kind: c.timestep_distribution,
            n,
            lo,
            hi,
            weight,
            bias,
            shift,
            cumulative: cumulative(c.timestep_distribution, hi - lo, weight, bias, shift),
            dynamic: None,
        }
    }

    /// Draws with a shift for each batch from its image size (width, height) instead.
    pub fn with_dynamic_shift(
        mut self,
        shift: impl Fn((usize, usize)) -> f64 + Send + Sync + 'static,
    ) -> Self {
        self.dynamic = Some(Box::new(shift));
        self
    }

    /// One timestep in `lo..hi` for a batch of images of `size` (width, height).
    pub fn draw_for(&self, r: &mut ChaCha8Rng, size: (usize, usize)) -> usize {
        match &self.dynamic {
            Some(shift) => self.draw_shifted(r, shift(size)),
            None => self.draw(r),
        }
    }

    /// One timestep in `lo..hi`.
    pub fn draw(&self, r: &mut ChaCha8Rng) -> usize {
        self.draw_shifted(r, self.shift)
    }

    fn draw_shifted(&self, r: &mut ChaCha8Rng, shift: f64) -> usize {
        let (lo, hi) = (self.lo, self.hi);
        let own;
        let cumulative = if shift == self.shift {
            &self.cumulative
        } else {
            own = cumulative(self.kind, hi - lo, self.weight, self.bias, shift);
            &own
        };
        if let Some(&total) = cumulative.last() {
            let u = r.random::<f64>() * total;
            let i = cumulative.partition_point(|&c| c <= u);
            return (lo + i).min(hi - 1);
        }
        let span = (hi - lo) as f64;
        let t = match self.kind {
            TimestepDistribution::LogitNormal => {
                let z: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, r);
                let normal = self.bias + (self.weight + 1.0) * z;
                lo as f64 + span / (1.0 + (-normal).exp())
            }
            TimestepDistribution::HeavyTail => {
                let u: f64 = r.random();
                let half_pi = std::f64::consts::FRAC_PI_2;
                let u = 1.0 - u - self.weight * ((half_pi * u).cos().powi(2) - 1.0 + u);
                lo as f64 + u * span
            }
            _ if shift == 1.0 => return r.random_range(lo..hi),
            _ => lo as f64 + span * r.random::<f64>(),
        };
        let n = self.n as f64;
        let t = n * shift * t / ((shift - 1.0) * t + n);
        (t.max(0.0) as usize).clamp(lo, hi - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(kind: TimestepDistribution, change: impl Fn(&mut TrainConfig)) -> [usize; 4] {
        let mut c = TrainConfig {
            timestep_distribution: kind,
            ..TrainConfig::default()
        };
        change(&mut c);
        let t = Timesteps::new(&c, 1000);
        let mut r = crate::data::rng(0, 0, 0);
        let mut h = [0; 4];
        for _ in 0..4000 {
            let s = t.draw(&mut r);
            assert!(s < 1000);
            h[s / 250] += 1;
        }
        h
    }

    #[test]
    fn distributions_put_their_weight_where_they_should() {
        let flat = histogram(TimestepDistribution::Uniform, |_| {});
        assert!(flat.iter().all(|&n| (850..1150).contains(&n)), "{flat:?}");
        // logit-normal and cos_map favour the middle; heavy_tail with weight 0 is uniform.
        let ln = histogram(TimestepDistribution::LogitNormal, |_| {});
        assert!(ln[1] + ln[2] > 2 * (ln[0] + ln[3]), "{ln:?}");
        let ht = histogram(TimestepDistribution::HeavyTail, |_| {});
        assert!(ht.iter().all(|&n| (850..1150).contains(&n)), "{ht:?}");
        // sigmoid with a steep weight: nearly all draws in the noisy half, almost none in the
        // cleanest quarter.
        let sig = histogram(TimestepDistribution::Sigmoid, |c| c.noising_weight = 20.0);
        assert!(
            sig[2] + sig[3] > 9 * (sig[0] + sig[1]) && sig[0] < 20,
            "{sig:?}"
        );
        let par = histogram(TimestepDistribution::InvertedParabola, |c| {
            c.noising_weight = 8.0
        });
        assert!(par[1] + par[2] > par[0] + par[3], "{par:?}");
        let cos = histogram(TimestepDistribution::CosMap, |_| {});
        assert!(cos[1] + cos[2] > cos[0] + cos[3], "{cos:?}");
        // A shift above 1 moves draws towards the noisy end.
        let shifted = histogram(TimestepDistribution::Uniform, |c| c.timestep_shift = 3.0);
        assert!(shifted[3] > 2 * shifted[0], "{shifted:?}");
        // The noising range bounds every draw.
        let mut c = TrainConfig {
            min_noising_strength: 0.25,
            max_noising_strength: 0.5,
            timestep_distribution: TimestepDistribution::Sigmoid,
            ..TrainConfig::default()
        };
        for kind in [
            TimestepDistribution::Uniform,
            TimestepDistribution::LogitNormal,
            TimestepDistribution::HeavyTail,
            TimestepDistribution::Sigmoid,
            TimestepDistribution::CosMap,
        ] {
            c.timestep_distribution = kind;
            let t = Timesteps::new(&c, 1000);
            let mut r = crate::data::rng(1, 0, 0);
            assert!(
                (0..500).all(|_| (250..500).contains(&t.draw(&mut r))),
                "{kind}"
            );
        }
    }
}

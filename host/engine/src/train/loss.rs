//! Loss pieces: per-element losses beside the squared error, and the weight of a timestep's loss
//! from its signal-to-noise ratio.

use ferrite_plugin_api::Tensor;

use crate::config::LossWeightFn;
use crate::sample::Prediction;

/// The weight of a timestep's loss from its signal-to-noise ratio: `min_snr_gamma` (Hang et al.;
/// strength = γ), `debiased_estimation` (1/√SNR, kohya's), `p2` (1/(1 + SNR)^strength, Choi et al.),
/// else 1.
pub fn loss_weight(function: LossWeightFn, strength: f64, snr: f64, prediction: Prediction) -> f64 {
    match function {
        LossWeightFn::MinSnrGamma => {
            let m = snr.min(strength);
            match prediction {
                Prediction::Epsilon => m / snr,
                Prediction::VPrediction => m / (snr + 1.0),
            }
        }
        // kohya clamps the SNR at 1000 so the noisiest steps do not dominate.
        LossWeightFn::DebiasedEstimation => 1.0 / snr.min(1000.0).sqrt(),
        LossWeightFn::P2 => 1.0 / (1.0 + snr).powf(strength),
        LossWeightFn::Constant => 1.0,
    }
}

/// The Huber loss of each element: quadratic within `delta`, linear beyond (torch's
/// `huber_loss`, reduction none).
pub fn huber(diff: &Tensor, delta: f64) -> ferrite_plugin_api::Result<Tensor> {
    let abs = diff.abs()?;
    let inside = abs.clamp(None, Some(delta))?;
    inside
        .powf(2.0)?
        .mul_scalar(0.5)?
        .add(&abs.sub(&inside)?.mul_scalar(delta)?)
}

/// log(cosh(x)) of each element, computed as |x| + log(1 + e^(−2|x|)) − log 2 so that large
/// differences do not overflow.
pub fn log_cosh(diff: &Tensor) -> ferrite_plugin_api::Result<Tensor> {
    let abs = diff.abs()?;
    abs.add(&abs.mul_scalar(-2.0)?.exp()?.add_scalar(1.0)?.log()?)?
        .sub_scalar(std::f64::consts::LN_2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huber_and_log_cosh() {
        crate::runtime::init("cpu").unwrap();
        let d = [-3.0f32, -1.0, -0.5, 0.0, 0.25, 2.0];
        let t = Tensor::from_f32(&d, &[6]).unwrap();
        let got = huber(&t, 1.0).unwrap().to_vec().unwrap();
        let want: Vec<f32> = d
            .iter()
            .map(|&x| {
                if x.abs() <= 1.0 {
                    0.5 * x * x
                } else {
                    x.abs() - 0.5
                }
            })
            .collect();
        assert_eq!(got, want);
        let got = log_cosh(&t).unwrap().to_vec().unwrap();
        for (g, x) in got.iter().zip(d) {
            assert!((g - (x as f64).cosh().ln() as f32).abs() < 1e-6, "{x}: {g}");
        }
    }

    #[test]
    fn timestep_weights() {
        let e = Prediction::Epsilon;
        assert_eq!(loss_weight(LossWeightFn::Constant, 5.0, 3.0, e), 1.0);
        assert_eq!(loss_weight(LossWeightFn::MinSnrGamma, 5.0, 10.0, e), 0.5);
        assert_eq!(loss_weight(LossWeightFn::MinSnrGamma, 5.0, 2.0, e), 1.0);
        assert_eq!(
            loss_weight(
                LossWeightFn::MinSnrGamma,
                5.0,
                10.0,
                Prediction::VPrediction
            ),
            5.0 / 11.0
        );
        assert_eq!(
            loss_weight(LossWeightFn::DebiasedEstimation, 0.0, 4.0, e),
            0.5
        );
        assert_eq!(loss_weight(LossWeightFn::P2, 1.0, 3.0, e), 0.25);
    }
}

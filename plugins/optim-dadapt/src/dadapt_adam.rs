//! D-Adaptation Adam (Defazio & Mishchenko 2023), with the dadaptation package's update: Adam
//! whose step size `d` is a lower bound on the distance to the solution, estimated as it goes.
//! `d` and the sums behind it stay on the device.

use ferrite_plugin_api::{
    Param, Result, Tensor,
    optim::{Slots, maximum, minimum, own, scalar, write, zeros_like},
};
use serde::{Deserialize, Serialize};

use crate::{masked, new_d};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DadaptAdamOptions {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW-style decay (on the weights) instead of adding it to the gradient.
    pub decouple: bool,
    pub use_bias_correction: bool,
    /// The starting d.
    pub d0: f64,
    /// The most d may grow in one step (a factor); null: no limit.
    pub growth_rate: Option<f64>,
}

impl Default for DadaptAdamOptions {
    fn default() -> Self {
        // OneTrainer's defaults.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: false,
            use_bias_correction: false,
            d0: 1e-6,
            growth_rate: None,
        }
    }
}

pub struct DadaptAdam {
    o: DadaptAdamOptions,
    slots: Slots,
    d: Tensor,
    numerator_weighted: Tensor,
    k: u64,
}

pub const FIELDS: &[&str] = &["s", "exp_avg", "exp_avg_sq"];

impl DadaptAdam {
    pub fn new(o: DadaptAdamOptions) -> Result<Self> {
        Ok(Self {
            d: scalar(o.d0)?,
            numerator_weighted: scalar(0.0)?,
            k: 0,
            slots: Slots::new("dadapt_adam", FIELDS),
            o,
        })
    }

    pub fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let o = self.o.clone();
        if lr <= 0.0 {
            return Ok(());
        }
        let k = self.k as i32 + 1;
        let bias = if o.use_bias_correction {
            (1.0 - o.beta2.powi(k)).sqrt() / (1.0 - o.beta1.powi(k))
        } else {
            1.0
        };
        let sqrt_beta2 = o.beta2.sqrt();
        let d = self.d.clone();
        let dlr = d.mul_scalar(lr * bias)?;
        let mut numerator = scalar(0.0)?;
        let mut sk_l1 = scalar(0.0)?;
        let mut taken = Vec::new();
        for p in params {
            let Some(g) = p.grad else { continue };
            let w = p.tensor.detach()?;
            let mut g = g.detach()?;
            if o.weight_decay != 0.0 && !o.decouple {
                g = g.add(&w.mul_scalar(o.weight_decay)?)?;
            }
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            if slot.tensors.is_empty() {
                for f in FIELDS {
                    slot.set(f, zeros_like(&g)?);
                }
            }
            slot.step += 1;
            let denom = slot.get("exp_avg_sq")?.sqrt()?.add_scalar(o.eps)?;
            let s = slot.get("s")?.clone();
            let dot = g.mul(&s.div(&denom)?)?.sum_all()?.reshape(&[1])?;
            numerator = numerator.add(&dot.mul(&dlr)?)?;
            let m = slot.get("exp_avg")?.mul_scalar(o.beta1)?;
            slot.set("exp_avg", m.add(&g.mul(&dlr.mul_scalar(1.0 - o.beta1)?)?)?);
            let v = slot.get("exp_avg_sq")?.mul_scalar(o.beta2)?;
            slot.set("exp_avg_sq", v.add(&g.mul(&g)?.mul_scalar(1.0 - o.beta2)?)?);
            let s = s
                .mul_scalar(sqrt_beta2)?
                .add(&g.mul(&dlr.mul_scalar(1.0 - sqrt_beta2)?)?)?;
            sk_l1 = sk_l1.add(&s.abs()?.sum_all()?.reshape(&[1])?)?;
            slot.set("s", s);
            taken.push(p);
        }
        if taken.is_empty() {
            return Ok(());
        }
        let weighted = self
            .numerator_weighted
            .mul_scalar(sqrt_beta2)?
            .add(&numerator.mul_scalar(1.0 - sqrt_beta2)?)?;
        // No gradient anywhere yet (the sum is 0): dadaptation returns without a step.
        let moving = sk_l1.gt_scalar(0.0)?;
        let d_hat = weighted.div(&sk_l1.mul_scalar(1.0 - sqrt_beta2)?)?;
        let capped = match o.growth_rate {
            Some(rate) => minimum(&d_hat, &d.mul_scalar(rate)?)?,
            None => d_hat,
        };
        self.d = new_d(&moving, &maximum(&d, &capped)?, &d)?;
        self.numerator_weighted = new_d(&moving, &weighted, &self.numerator_weighted)?;
        for p in taken {
            let slot = &self.slots.by_param[p.name];
            let before = p.tensor.detach()?;
            let mut w = before.clone();
            if o.weight_decay != 0.0 && o.decouple {
                w = w.sub(&w.mul(&dlr.mul_scalar(o.weight_decay)?)?)?;
            }
            let denom = slot.get("exp_avg_sq")?.sqrt()?.add_scalar(o.eps)?;
            let w = w.sub(&slot.get("exp_avg")?.div(&denom)?)?;
            write(p.tensor, &masked(&moving, &w, &before)?)?;
        }
        self.k += 1;
        Ok(())
    }

    /// The parameters' `step`, `s`, `exp_avg`, `exp_avg_sq`, and `d`, `numerator_weighted`, `k`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(vec![
            ("d".into(), self.d.clone()),
            ("numerator_weighted".into(), self.numerator_weighted.clone()),
            ("k".into(), Tensor::from_f32(&[self.k as f32], &[1])?),
        ])
    }

    pub fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let mut own_state = self.slots.load(state)?;
        self.d = own(&mut own_state, "dadapt_adam", "d")?;
        self.numerator_weighted = own(&mut own_state, "dadapt_adam", "numerator_weighted")?;
        self.k = own(&mut own_state, "dadapt_adam", "k")?.item()? as u64;
        self.slots.no_more(own_state)
    }
}

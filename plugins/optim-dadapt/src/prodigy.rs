//! Prodigy (Mishchenko & Defazio 2023), with prodigyopt's update: Adam whose step size `d` is
//! estimated from how far the weights moved against the gradients. `d` and the sums behind it
//! stay on the device.

use ferrite_plugin_api::{
    DType, Param, Result, Tensor,
    optim::{Slots, maximum, minimum, own, scalar, write, zeros_like},
};
use serde::{Deserialize, Serialize};

use crate::{masked, new_d};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProdigyOptions {
    pub beta1: f64,
    pub beta2: f64,
    /// How slowly the d estimate's sums decay; null: √beta2.
    pub beta3: Option<f64>,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW-style decay (on the weights) instead of adding it to the gradient.
    pub decouple: bool,
    pub use_bias_correction: bool,
    /// Leave the learning rate out of the denominator's sum (for warmup schedules).
    pub safeguard_warmup: bool,
    /// The starting d.
    pub d0: f64,
    /// Scales the estimate (below 1: smaller steps).
    pub d_coef: f64,
    /// The most d may grow in one step (a factor); null: no limit.
    pub growth_rate: Option<f64>,
    /// Estimate d from every slice_p-th element of each parameter (saves memory).
    pub slice_p: usize,
}

impl Default for ProdigyOptions {
    fn default() -> Self {
        // OneTrainer's defaults.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: None,
            slice_p: 11,
        }
    }
}

pub struct Prodigy {
    o: ProdigyOptions,
    slots: Slots,
    d: Tensor,
    d_max: Tensor,
    d_numerator: Tensor,
    /// Steps taken (prodigyopt's `k`, for bias correction).
    k: u64,
}

pub const FIELDS: &[&str] = &["s", "p0", "exp_avg", "exp_avg_sq"];

/// Every `every`-th element of `t`, flattened (prodigyopt's `flatten()[::slice_p]`).
fn sliced(t: &Tensor, every: usize) -> Result<Tensor> {
    let flat = t.reshape(&[-1])?;
    if every == 1 {
        return Ok(flat);
    }
    let n = flat.dim(0)? as i64;
    flat.index_select(0, &Tensor::arange(0, n, every as i64, DType::I64)?)
}

impl Prodigy {
    pub fn new(o: ProdigyOptions) -> Result<Self> {
        Ok(Self {
            d: scalar(o.d0)?,
            d_max: scalar(o.d0)?,
            d_numerator: scalar(0.0)?,
            k: 0,
            slots: Slots::new("prodigy", FIELDS),
            o,
        })
    }

    pub fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let o = self.o.clone();
        if lr <= 0.0 {
            return Ok(());
        }
        let beta3 = o.beta3.unwrap_or(o.beta2.sqrt());
        let k = self.k as i32 + 1;
        let bias = if o.use_bias_correction {
            (1.0 - o.beta2.powi(k)).sqrt() / (1.0 - o.beta1.powi(k))
        } else {
            1.0
        };
        let d = self.d.clone();
        let dlr = d.mul_scalar(lr * bias)?;
        let d_over_d0 = d.div_scalar(o.d0)?;
        let s_rate = d_over_d0.mul(if o.safeguard_warmup { &d } else { &dlr })?;
        let mut delta = scalar(0.0)?;
        let mut denom = scalar(0.0)?;
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
                let p0 = sliced(&w, o.slice_p)?.cast(DType::F32)?;
                slot.set("s", zeros_like(&p0)?);
                slot.set("p0", p0);
                if o.beta1 > 0.0 {
                    slot.set("exp_avg", zeros_like(&g)?);
                }
                slot.set("exp_avg_sq", zeros_like(&g)?);
            }
            slot.step += 1;
            let sg = sliced(&g, o.slice_p)?;
            let moved = slot.get("p0")?.sub(&sliced(&w, o.slice_p)?)?;
            delta = delta.add(
                &sg.mul(&moved)?
                    .sum_all()?
                    .reshape(&[1])?
                    .mul(&d_over_d0.mul(&dlr)?)?,
            )?;
            if o.beta1 > 0.0 {
                let m = slot.get("exp_avg")?.mul_scalar(o.beta1)?;
                slot.set("exp_avg", m.add(&g.mul(&d.mul_scalar(1.0 - o.beta1)?)?)?);
            }
            let v = slot.get("exp_avg_sq")?.mul_scalar(o.beta2)?;
            let dd = d.mul(&d)?.mul_scalar(1.0 - o.beta2)?;
            slot.set("exp_avg_sq", v.add(&g.mul(&g)?.mul(&dd)?)?);
            let s = slot.get("s")?.mul_scalar(beta3)?.add(&sg.mul(&s_rate)?)?;
            denom = denom.add(&s.abs()?.sum_all()?.reshape(&[1])?)?;
            slot.set("s", s);
            taken.push((p, g));
        }
        if taken.is_empty() {
            return Ok(());
        }
        // No gradient anywhere yet (the sums are 0): prodigyopt returns without a step.
        let moving = denom.gt_scalar(0.0)?;
        let numerator = self.d_numerator.mul_scalar(beta3)?.add(&delta)?;
        let d_hat = numerator.div(&denom)?.mul_scalar(o.d_coef)?;
        let first = Tensor::where_(&d.eq(&scalar(o.d0)?)?, &maximum(&d, &d_hat)?, &d)?;
        let d_max = maximum(&self.d_max, &d_hat)?;
        let next = match o.growth_rate {
            Some(rate) => minimum(&d_max, &first.mul_scalar(rate)?)?,
            None => d_max.clone(),
        };
        let next = new_d(&moving, &next, &d)?;
        self.d_max = new_d(&moving, &d_max, &self.d_max)?;
        self.d_numerator = new_d(&moving, &numerator, &self.d_numerator)?;
        self.d = next.clone();
        let eps = next.mul_scalar(o.eps)?;
        for (p, g) in taken {
            let slot = &self.slots.by_param[p.name];
            let before = p.tensor.detach()?;
            let mut w = before.clone();
            if o.weight_decay != 0.0 && o.decouple {
                w = w.sub(&w.mul(&dlr.mul_scalar(o.weight_decay)?)?)?;
            }
            let denom = slot.get("exp_avg_sq")?.sqrt()?.add(&eps)?;
            let step = match slot.tensors.get("exp_avg") {
                Some(m) => m.div(&denom)?.mul(&dlr)?,
                None => g.div(&denom)?.mul(&dlr.mul(&next)?)?,
            };
            write(p.tensor, &masked(&moving, &w.sub(&step)?, &before)?)?;
        }
        self.k += 1;
        Ok(())
    }

    /// The parameters' `step`, `s`, `p0`, `exp_avg`, `exp_avg_sq`, and `d`, `d_max`,
    /// `d_numerator`, `k`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(vec![
            ("d".into(), self.d.clone()),
            ("d_max".into(), self.d_max.clone()),
            ("d_numerator".into(), self.d_numerator.clone()),
            ("k".into(), Tensor::from_f32(&[self.k as f32], &[1])?),
        ])
    }

    pub fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let mut own_state = self.slots.load(state)?;
        self.d = own(&mut own_state, "prodigy", "d")?;
        self.d_max = own(&mut own_state, "prodigy", "d_max")?;
        self.d_numerator = own(&mut own_state, "prodigy", "d_numerator")?;
        self.k = own(&mut own_state, "prodigy", "k")?.item()? as u64;
        self.slots.no_more(own_state)
    }
}

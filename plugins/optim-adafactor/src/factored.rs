//! A running mean of a squared quantity, factored for tensors of two or more dimensions: the
//! means over the last dimension (rows) and over the one before (columns), from which the
//! inverse square root of the whole is approximated (fairseq's `_approx_sq_grad`).

use ferrite_plugin_api::{Result, Tensor, optim::Slot};

pub struct SecondMoment {
    /// The state fields' stem (`exp_avg_sq` → `exp_avg_sq_row`, `exp_avg_sq_col`).
    stem: &'static str,
    /// The rank of the tensor, when factored (2 or more).
    rank: Option<usize>,
}

impl SecondMoment {
    /// Starts the fields for `like` in `slot` when the parameter has none.
    pub fn new(slot: &mut Slot, stem: &'static str, like: &Tensor) -> Result<Self> {
        let shape = like.shape()?;
        let rank = (shape.len() >= 2).then_some(shape.len());
        let me = Self { stem, rank };
        if rank.is_some() {
            let n = shape.len();
            let row: Vec<usize> = shape[..n - 1].to_vec();
            let col: Vec<usize> = shape[..n - 2]
                .iter()
                .chain(&shape[n - 1..])
                .copied()
                .collect();
            for (f, s) in [(me.field("row"), row), (me.field("col"), col)] {
                if !slot.tensors.contains_key(&f) {
                    slot.set(&f, Tensor::zeros(&s, ferrite_plugin_api::DType::F32)?);
                }
            }
        } else if !slot.tensors.contains_key(stem) {
            slot.set(stem, Tensor::zeros(&shape, ferrite_plugin_api::DType::F32)?);
        }
        Ok(me)
    }

    fn field(&self, part: &str) -> String {
        format!("{}_{part}", self.stem)
    }

    pub fn factored(&self) -> bool {
        self.rank.is_some()
    }

    /// Folds `sq` in with decay `beta`; returns the inverse square root of the mean (the
    /// preconditioner the update is multiplied by).
    pub fn update(&self, slot: &mut Slot, sq: &Tensor, beta: f64) -> Result<Tensor> {
        let ema =
            |old: &Tensor, new: Tensor| old.mul_scalar(beta)?.add(&new.mul_scalar(1.0 - beta)?);
        let Some(n) = self.rank else {
            let v = ema(slot.get(self.stem)?, sq.clone())?;
            slot.set(self.stem, v.clone());
            return v.rsqrt();
        };
        let (rf, cf) = (self.field("row"), self.field("col"));
        let row = ema(slot.get(&rf)?, sq.mean(&[n - 1], false)?)?;
        let col = ema(slot.get(&cf)?, sq.mean(&[n - 2], false)?)?;
        slot.set(&rf, row.clone());
        slot.set(&cf, col.clone());
        let r = row
            .div(&row.mean(&[n - 2], true)?)?
            .rsqrt()?
            .unsqueeze(n - 1)?;
        let c = col.unsqueeze(n - 2)?.rsqrt()?;
        r.mul(&c)
    }
}

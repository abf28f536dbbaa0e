//! Helpers shared by optimizer plugins: per-parameter state saved as `<parameter>.<field>` (the
//! optimizer's own values under names without a dot), and arithmetic on one-element device
//! tensors, so that adaptive optimizers keep their scalars on the device (no host sync a step).

use std::collections::BTreeMap;

use crate::abi::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One parameter's state: how many steps it took (a parameter without a gradient does not
/// count the step, as in torch) and its tensors by field name.
#[derive(Default)]
pub struct Slot {
    pub step: u64,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Slot {
    /// A field the optimizer made (an error names it when a loaded state lacks it).
    pub fn get(&self, field: &str) -> Result<&Tensor> {
        self.tensors.get(field).ok_or_else(|| {
            Error(format!(
                "optimizer state has no `{field}` (a backup of this optimizer with other \
                     options?)"
            ))
        })
    }

    pub fn set(&mut self, field: &str, t: Tensor) {
        self.tensors.insert(field.to_string(), t);
    }

    /// Takes the fields out (to be `set` again after the step), zeros shaped like `like` at a
    /// parameter's first step; a state that has some of them but not all is an error (it would
    /// restart half an estimate).
    pub fn take_or_zeros<const N: usize>(
        &mut self,
        fields: [&str; N],
        like: &Tensor,
    ) -> Result<[Tensor; N]> {
        let fresh = fields.iter().all(|f| !self.tensors.contains_key(*f));
        let mut out = Vec::with_capacity(N);
        for f in fields {
            out.push(match self.tensors.remove(f) {
                Some(t) => t,
                None if fresh => zeros_like(like)?,
                None => {
                    return Err(Error(format!(
                        "optimizer state has {:?} but no `{f}` (a backup of this optimizer \
                         with other options?)",
                        fields.iter().filter(|g| **g != f).collect::<Vec<_>>()
                    )));
                }
            });
        }
        out.try_into()
            .map_err(|_| Error::msg("optimizer state: a field count changed"))
    }
}

/// Every parameter's [`Slot`], by parameter name, and the optimizer's own state tensors.
pub struct Slots {
    /// The optimizer's id, for errors.
    who: &'static str,
    /// The field names a parameter's state may hold.
    fields: &'static [&'static str],
    pub by_param: BTreeMap<String, Slot>,
}

impl Slots {
    pub fn new(who: &'static str, fields: &'static [&'static str]) -> Self {
        Self {
            who,
            fields,
            by_param: BTreeMap::new(),
        }
    }

    /// `<parameter>.step` and `<parameter>.<field>` for each parameter, then `own` as given.
    pub fn save(&self, own: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, slot) in &self.by_param {
            out.push((
                format!("{name}.step"),
                Tensor::from_f32(&[slot.step as f32], &[1])?,
            ));
            for (field, t) in &slot.tensors {
                out.push((format!("{name}.{field}"), t.clone()));
            }
        }
        out.extend(own);
        Ok(out)
    }

    /// Replaces the per-parameter state with a saved one; returns the optimizer's own entries
    /// (names without a dot). Unknown fields and parameters without a step are refused.
    pub fn load(&mut self, state: Vec<(String, Tensor)>) -> Result<BTreeMap<String, Tensor>> {
        let mut own = BTreeMap::new();
        let mut slots: BTreeMap<String, (Option<u64>, Slot)> = BTreeMap::new();
        for (name, t) in state {
            let Some((param, field)) = name.rsplit_once('.') else {
                own.insert(name, t);
                continue;
            };
            let entry = slots.entry(param.to_string()).or_default();
            if field == "step" {
                entry.0 = Some(t.item()? as u64);
            } else if self.fields.contains(&field) {
                entry.1.set(field, t);
            } else {
                return Err(Error(format!("unknown {} state tensor `{name}`", self.who)));
            }
        }
        self.by_param = slots
            .into_iter()
            .map(|(name, (step, mut slot))| {
                slot.step = step
                    .ok_or_else(|| Error(format!("{} state for `{name}` has no step", self.who)))?;
                Ok((name, slot))
            })
            .collect::<Result<_>>()?;
        Ok(own)
    }
}

impl Slots {
    /// [`Slots::load`] for an optimizer with no state of its own: any such entry is refused.
    pub fn load_all(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let own = self.load(state)?;
        self.no_more(own)
    }

    /// Refuses the optimizer's own entries left after it took those it knows.
    pub fn no_more(&self, left: BTreeMap<String, Tensor>) -> Result<()> {
        match left.keys().next() {
            Some(name) => Err(Error(format!("unknown {} state tensor `{name}`", self.who))),
            None => Ok(()),
        }
    }
}

/// A saved value of the optimizer's own, or an error naming it.
pub fn own(entries: &mut BTreeMap<String, Tensor>, who: &str, name: &str) -> Result<Tensor> {
    entries
        .remove(name)
        .ok_or_else(|| Error(format!("{who} state has no `{name}`")))
}

/// A one-element f32 tensor: a scalar that stays on the device.
pub fn scalar(v: f64) -> Result<Tensor> {
    Tensor::full(&[1], v, DType::F32)
}

/// A host-side f64 the optimizer keeps (a sum over steps) as a saveable tensor: three f32
/// parts whose sum is the value exactly (f32 alone would change it on a resume).
pub fn f64_tensor(v: f64) -> Result<Tensor> {
    let hi = v as f32;
    let mid = (v - hi as f64) as f32;
    let lo = (v - hi as f64 - mid as f64) as f32;
    Tensor::from_f32(&[hi, mid, lo], &[3])
}

/// The value [`f64_tensor`] saved.
pub fn f64_of(t: &Tensor) -> Result<f64> {
    Ok(t.to_vec()?.iter().map(|&x| x as f64).sum())
}

/// The larger of `a` and `b`, element by element.
pub fn maximum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Tensor::where_(&a.gt(b)?, a, b)
}

/// The smaller of `a` and `b`, element by element.
pub fn minimum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Tensor::where_(&a.lt(b)?, a, b)
}

/// -1, 0 or 1 by the sign of each element (torch's `sign`: 0 stays 0).
pub fn sign(t: &Tensor) -> Result<Tensor> {
    let pos = t.gt_scalar(0.0)?.cast(DType::F32)?;
    let neg = t.lt_scalar(0.0)?.cast(DType::F32)?;
    pos.sub(&neg)
}

/// Root mean square of all elements, as a one-element tensor (transformers' `_rms`).
pub fn rms(t: &Tensor) -> Result<Tensor> {
    t.mul(t)?.mean_all()?.sqrt()?.reshape(&[1])
}

/// Writes `value` into the parameter in the parameter's own dtype (the state may be another).
pub fn write(param: &Tensor, value: &Tensor) -> Result<()> {
    param.assign(&value.cast(param.dtype()?)?)
}

/// Zeros in `t`'s shape, in f32 (optimizer state is kept in f32).
pub fn zeros_like(t: &Tensor) -> Result<Tensor> {
    Tensor::zeros(&t.shape()?, DType::F32)
}

/// The state field of a parameter's weights to evaluate with, where they are not the trained
/// ones (schedule-free optimizers train at one point and evaluate at another): an optimizer that
/// returns `<parameter>.eval` from `state()` has the host put those in place for samples,
/// validation and the saved model. They are derived, so backups leave them out and
/// `load_state` never gets them.
pub const EVAL_FIELD: &str = "eval";

/// Multi-tensor ops (ABI 1.7): one host call over a whole list, where a per-tensor loop makes
/// one call per tensor and op.
pub mod foreach {
    use crate::error::{Error, Result};
    use crate::host::call;
    use crate::op::{self, Op};
    use crate::tensor::Tensor;

    fn lists<'a>(lists: &[&'a [Tensor]]) -> Result<Vec<&'a Tensor>> {
        let n = lists[0].len();
        if lists.iter().any(|l| l.len() != n) {
            return Err(Error::msg("foreach: the lists differ in length"));
        }
        Ok(lists.iter().flat_map(|l| l.iter()).collect())
    }

    fn run(op: Op, inputs: Vec<&Tensor>) -> Result<Vec<Tensor>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        call(op, &inputs)
    }

    /// `a·xᵢ + b·yᵢ`.
    pub fn axpby(a: f64, x: &[Tensor], b: f64, y: &[Tensor]) -> Result<Vec<Tensor>> {
        run(Op::ForeachAxpby(op::Axpby { a, b }), lists(&[x, y])?)
    }

    /// `a·xᵢ + b·yᵢ·zᵢ`.
    pub fn addcmul(
        a: f64,
        x: &[Tensor],
        b: f64,
        y: &[Tensor],
        z: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        run(Op::ForeachAddcmul(op::Axpby { a, b }), lists(&[x, y, z])?)
    }

    /// `a·xᵢ + b·yᵢ / (c·√zᵢ + eps)` (Adam's step).
    #[allow(clippy::too_many_arguments)]
    pub fn addcdiv_sqrt(
        a: f64,
        x: &[Tensor],
        b: f64,
        y: &[Tensor],
        c: f64,
        z: &[Tensor],
        eps: f64,
    ) -> Result<Vec<Tensor>> {
        let op = Op::ForeachAddcdivSqrt(op::AddcdivSqrt { a, b, c, eps });
        run(op, lists(&[x, y, z])?)
    }

    /// Assigns `valuesᵢ` into `targetsᵢ` (as [`Tensor::assign`]).
    pub fn assign(targets: &[Tensor], values: &[Tensor]) -> Result<()> {
        run(Op::ForeachAssign(op::NoArgs {}), lists(&[targets, values])?).map(|_| ())
    }
}

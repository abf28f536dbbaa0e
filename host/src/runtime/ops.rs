//! Every ABI op, implemented on burn's backend primitives (ranks are dynamic at the ABI).

use std::sync::{Arc, Mutex};

use burn_backend::{
    AutodiffBackend, Distribution, Scalar, Shape, Slice, TensorData, TensorMetadata,
    ops::{
        AttentionModuleOptions, ConvOptions, ConvTransposeOptions, InterpolateMode,
        InterpolateOptions,
    },
    tensor::FloatTensor,
};
use ferrite_plugin_api::{DType, OpCode, TensorId, abi::Attr};
use rand::Rng;
use rand_distr::StandardNormal;

use super::RtResult;
use super::table::{TensorTable, Tracking, Value, float_dtype};

type F<B> = FloatTensor<B>;
/// Optional affine weight and bias of a norm.
type Affine<B> = (Option<F<B>>, Option<F<B>>);

/// Typed access to an op's attributes, with errors that name the op and position.
struct Attrs<'a> {
    op: OpCode,
    a: &'a [Attr],
}

impl Attrs<'_> {
    fn at(&self, i: usize) -> RtResult<&Attr> {
        self.a
            .get(i)
            .ok_or_else(|| format!("op {}: missing attribute {i}", self.op.name()))
    }
    fn err<T>(&self, i: usize, want: &str) -> RtResult<T> {
        Err(format!(
            "op {}: attribute {i} should be {want}, got {:?}",
            self.op.name(),
            self.a.get(i)
        ))
    }
    fn int(&self, i: usize) -> RtResult<i64> {
        match self.at(i)? {
            Attr::Int(v) => Ok(*v),
            _ => self.err(i, "an integer"),
        }
    }
    fn usize(&self, i: usize) -> RtResult<usize> {
        let v = self.int(i)?;
        usize::try_from(v).map_err(|_| {
            format!(
                "op {}: attribute {i} must not be negative, got {v}",
                self.op.name()
            )
        })
    }
    fn ints(&self, i: usize) -> RtResult<&[i64]> {
        match self.at(i)? {
            Attr::Ints(v) => Ok(v.as_slice()),
            _ => self.err(i, "a list of integers"),
        }
    }
    fn usizes(&self, i: usize) -> RtResult<Vec<usize>> {
        self.ints(i)?
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| {
                    format!("op {}: negative size {v} in attribute {i}", self.op.name())
                })
            })
            .collect()
    }
    fn pair(&self, i: usize) -> RtResult<[usize; 2]> {
        match self.usizes(i)?.as_slice() {
            [a, b] => Ok([*a, *b]),
            _ => self.err(i, "two integers"),
        }
    }
    fn float(&self, i: usize) -> RtResult<f64> {
        match self.at(i)? {
            Attr::Float(v) => Ok(*v),
            Attr::Int(v) => Ok(*v as f64),
            _ => self.err(i, "a number"),
        }
    }
    fn opt_float(&self, i: usize) -> RtResult<Option<f64>> {
        match self.a.get(i) {
            None | Some(Attr::None) => Ok(None),
            _ => self.float(i).map(Some),
        }
    }
    fn boolean(&self, i: usize) -> RtResult<bool> {
        match self.at(i)? {
            Attr::Bool(v) => Ok(*v),
            _ => self.err(i, "a bool"),
        }
    }
    fn str(&self, i: usize) -> RtResult<&str> {
        match self.at(i)? {
            Attr::Str(v) => Ok(v.as_str()),
            _ => self.err(i, "a string"),
        }
    }
    fn dtype(&self, i: usize) -> RtResult<DType> {
        match self.at(i)? {
            Attr::DType(v) => Ok(*v),
            _ => self.err(i, "a dtype"),
        }
    }
    fn floats(&self, i: usize) -> RtResult<&[f32]> {
        match self.at(i)? {
            Attr::Floats(v) => Ok(v.as_slice()),
            _ => self.err(i, "a list of floats"),
        }
    }
}

fn shape_of<B: AutodiffBackend>(t: &F<B>) -> Vec<usize> {
    t.shape().to_vec()
}

fn full_slices(rank: usize) -> Vec<Slice> {
    vec![
        Slice {
            start: 0,
            end: None,
            step: 1
        };
        rank
    ]
}

/// Numpy broadcasting of two shapes, or an error naming both.
fn broadcast_shape(a: &[usize], b: &[usize]) -> RtResult<Vec<usize>> {
    let r = a.len().max(b.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, r - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (pa, pb) = (pad(a), pad(b));
    pa.iter()
        .zip(&pb)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Ok(x),
            (1, _) => Ok(y),
            (_, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

fn to_rank<B: AutodiffBackend>(t: F<B>, rank: usize) -> F<B> {
    let s = shape_of::<B>(&t);
    if s.len() >= rank {
        return t;
    }
    let new: Vec<usize> = std::iter::repeat_n(1, rank - s.len()).chain(s).collect();
    B::float_reshape(t, Shape::from(new))
}

/// Brings two operands to a common rank after checking they broadcast (the backend broadcasts
/// size-1 dimensions itself, and autodiff reduces the gradients back).
fn align<B: AutodiffBackend>(a: F<B>, b: F<B>) -> RtResult<(F<B>, F<B>)> {
    let out = broadcast_shape(&shape_of::<B>(&a), &shape_of::<B>(&b))?;
    Ok((to_rank::<B>(a, out.len()), to_rank::<B>(b, out.len())))
}

fn check_dim(op: OpCode, dim: usize, rank: usize) -> RtResult<()> {
    if dim >= rank {
        return Err(format!(
            "op {}: dimension {dim} out of range for rank {rank}",
            op.name()
        ));
    }
    Ok(())
}

fn resolve_reshape(op: OpCode, from: &[usize], to: &[i64]) -> RtResult<Vec<usize>> {
    let numel: usize = from.iter().product();
    let known: i64 = to.iter().filter(|&&d| d != -1).product();
    let infer = to.iter().filter(|&&d| d == -1).count();
    if infer > 1 || to.iter().any(|&d| d < -1) {
        return Err(format!("op {}: invalid target shape {to:?}", op.name()));
    }
    let out: Vec<usize> = to
        .iter()
        .map(|&d| {
            if d == -1 {
                if known == 0 {
                    0
                } else {
                    numel / known as usize
                }
            } else {
                d as usize
            }
        })
        .collect();
    if out.iter().product::<usize>() != numel {
        return Err(format!(
            "op {}: cannot reshape {from:?} ({numel} elements) to {to:?}",
            op.name()
        ));
    }
    Ok(out)
}

fn reduce_dims(op: OpCode, dims: &[usize], rank: usize) -> RtResult<Vec<usize>> {
    for &d in dims {
        check_dim(op, d, rank)?;
    }
    let mut d: Vec<usize> = if dims.is_empty() {
        (0..rank).collect()
    } else {
        dims.to_vec()
    };
    d.sort_unstable();
    d.dedup();
    Ok(d)
}

impl<B: Tracking> TensorTable<B> {
    fn n_inputs(
        op: OpCode,
        inputs: &[TensorId],
        range: std::ops::RangeInclusive<usize>,
    ) -> RtResult<()> {
        if !range.contains(&inputs.len()) {
            return Err(format!(
                "op {}: expected {}..={} tensor inputs, got {}",
                op.name(),
                range.start(),
                range.end(),
                inputs.len()
            ));
        }
        Ok(())
    }

    /// Sum/mean/max over `dims` (all when empty), keeping or dropping them.
    fn reduce(&self, op: OpCode, t: F<B>, dims: &[usize], keepdim: bool) -> RtResult<F<B>> {
        let shape = shape_of::<B>(&t);
        let dims = reduce_dims(op, dims, shape.len())?;
        let mut t = t;
        for &d in &dims {
            t = match op {
                OpCode::SUM => B::float_sum_dim(t, d),
                OpCode::MEAN => B::float_mean_dim(t, d),
                _ => B::float_max_dim(t, d),
            };
        }
        if keepdim {
            return Ok(t);
        }
        let mut out: Vec<usize> = shape
            .iter()
            .enumerate()
            .filter(|(i, _)| !dims.contains(i))
            .map(|(_, &s)| s)
            .collect();
        if out.is_empty() {
            out.push(1);
        }
        Ok(B::float_reshape(t, Shape::from(out)))
    }

    fn variance(
        &self,
        t: F<B>,
        dims: &[usize],
        keepdim: bool,
        correction: usize,
    ) -> RtResult<F<B>> {
        let shape = shape_of::<B>(&t);
        let dims = reduce_dims(OpCode::VAR, dims, shape.len())?;
        let n: usize = dims.iter().map(|&d| shape[d]).product();
        if n <= correction {
            return Err(format!("op var: {n} elements with correction {correction}"));
        }
        let mean = self.reduce(OpCode::MEAN, t.clone(), &dims, true)?;
        let c = B::float_sub(t, mean);
        let sq = B::float_mul(c.clone(), c);
        let s = self.reduce(OpCode::SUM, sq, &dims, keepdim)?;
        Ok(B::float_div_scalar(
            s,
            Scalar::Float((n - correction) as f64),
        ))
    }

    /// Normalises over the last dimension of `x` (population variance).
    fn normalize_last(&self, x: F<B>, eps: f64) -> RtResult<F<B>> {
        let last = shape_of::<B>(&x).len() - 1;
        let mean = self.reduce(OpCode::MEAN, x.clone(), &[last], true)?;
        let var = self.variance(x.clone(), &[last], true, 0)?;
        let denom = B::float_sqrt(B::float_add_scalar(var, Scalar::Float(eps)));
        Ok(B::float_div(B::float_sub(x, mean), denom))
    }

    fn channel_affine(
        &self,
        x: F<B>,
        w: Option<F<B>>,
        b: Option<F<B>>,
        channel_dim: usize,
    ) -> RtResult<F<B>> {
        let shape = shape_of::<B>(&x);
        let mut view = vec![1; shape.len()];
        view[channel_dim] = shape[channel_dim];
        let mut x = x;
        for (p, is_w) in [(w, true), (b, false)] {
            if let Some(p) = p {
                let ps = shape_of::<B>(&p);
                if ps.iter().product::<usize>() != shape[channel_dim] {
                    return Err(format!(
                        "norm: parameter of shape {ps:?} does not match {} channels",
                        shape[channel_dim]
                    ));
                }
                let p = B::float_reshape(p, Shape::from(view.clone()));
                x = if is_w {
                    B::float_mul(x, p)
                } else {
                    B::float_add(x, p)
                };
            }
        }
        Ok(x)
    }

    /// Optional weight and bias inputs, as flagged by the last two attributes.
    fn norm_params(&self, inputs: &[TensorId], a: &Attrs, flags_at: usize) -> RtResult<Affine<B>> {
        let (hw, hb) = (a.boolean(flags_at)?, a.boolean(flags_at + 1)?);
        let mut next = inputs.iter().skip(1);
        let mut take = |present: bool| -> RtResult<Option<F<B>>> {
            if !present {
                return Ok(None);
            }
            let id = next
                .next()
                .ok_or_else(|| format!("op {}: missing affine parameter input", a.op.name()))?;
            self.float(*id).map(Some)
        };
        Ok((take(hw)?, take(hb)?))
    }

    fn random(&mut self, op: OpCode, shape: Vec<usize>, rng: u64) -> RtResult<Value<B>> {
        let n: usize = shape.iter().product();
        let g = self
            .rngs
            .get_mut(&rng)
            .ok_or_else(|| format!("op {}: generator {rng} does not exist", op.name()))?;
        let v: Vec<f32> = if op == OpCode::RANDN {
            (0..n).map(|_| g.sample(StandardNormal)).collect()
        } else {
            (0..n).map(|_| g.random::<f32>()).collect()
        };
        Ok(Value::Float(B::float_from_data(
            TensorData::new(v, shape),
            &self.device,
        )))
    }

    fn narrow_value(
        &self,
        v: Value<B>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> RtResult<Value<B>> {
        let shape = v.shape();
        check_dim(OpCode::NARROW, dim, shape.len())?;
        if start + len > shape[dim] {
            return Err(format!(
                "op narrow: {start}+{len} exceeds size {} of dimension {dim} (shape {shape:?})",
                shape[dim]
            ));
        }
        let mut s = full_slices(shape.len());
        s[dim] = Slice {
            start: start as isize,
            end: Some((start + len) as isize),
            step: 1,
        };
        Ok(match v {
            Value::Float(t) => Value::Float(B::float_slice(t, &s)),
            Value::Int(t) => Value::Int(B::int_slice(t, &s)),
            Value::Bool(t) => Value::Bool(B::bool_slice(t, &s)),
            Value::Grads(_) => return Err("op narrow: not a tensor".into()),
        })
    }

    fn reshape_value(v: Value<B>, shape: Vec<usize>) -> RtResult<Value<B>> {
        let s = Shape::from(shape);
        Ok(match v {
            Value::Float(t) => Value::Float(B::float_reshape(t, s)),
            Value::Int(t) => Value::Int(B::int_reshape(t, s)),
            Value::Bool(t) => Value::Bool(B::bool_reshape(t, s)),
            Value::Grads(_) => return Err("cannot reshape gradients".into()),
        })
    }

    /// Runs one op. Outputs are new values; the caller stores them.
    pub fn exec(
        &mut self,
        op: OpCode,
        inputs: &[TensorId],
        attrs: &[Attr],
    ) -> RtResult<Vec<Value<B>>> {
        let a = Attrs { op, a: attrs };
        let dev = self.device.clone();
        let bool_dt = self.settings().bool_dtype;
        let one = |t: F<B>| Ok(vec![Value::Float(t)]);
        let x = |i: usize| -> RtResult<F<B>> {
            let id = inputs
                .get(i)
                .ok_or_else(|| format!("op {}: missing tensor input {i}", op.name()))?;
            self.float(*id)
        };
        match op {
            OpCode::ZEROS | OpCode::ONES | OpCode::FULL => {
                let shape = Shape::from(a.usizes(0)?);
                let (value, dt) = match op {
                    OpCode::FULL => (a.float(1)?, a.dtype(2)?),
                    OpCode::ONES => (1.0, a.dtype(1)?),
                    _ => (0.0, a.dtype(1)?),
                };
                if dt == DType::I64 || dt == DType::I32 {
                    let data = TensorData::full(shape, value as i64);
                    return Ok(vec![Value::Int(B::int_from_data(
                        data.convert_dtype(self.settings().int_dtype.into()),
                        &dev,
                    ))]);
                }
                one(B::float_full(
                    shape,
                    Scalar::Float(value),
                    &dev,
                    float_dtype(dt)?,
                ))
            }
            OpCode::ARANGE => {
                let (start, end, step, dt) = (a.int(0)?, a.int(1)?, a.usize(2)?, a.dtype(3)?);
                if step == 0 || end < start {
                    return Err(format!(
                        "op arange: empty or invalid range {start}..{end} step {step}"
                    ));
                }
                let t = B::int_arange_step(start..end, step, &dev, self.settings().int_dtype);
                if dt.is_float() {
                    one(B::int_into_float(t, float_dtype(dt)?))
                } else {
                    Ok(vec![Value::Int(t)])
                }
            }
            OpCode::RANDN | OpCode::RAND => {
                let shape = a.usizes(0)?;
                Ok(vec![self.random(op, shape, a.int(1)? as u64)?])
            }
            OpCode::FROM_F32 => {
                let (data, shape) = (a.floats(0)?, a.usizes(1)?);
                if data.len() != shape.iter().product::<usize>() {
                    return Err(format!(
                        "op from_f32: {} values do not fill shape {shape:?}",
                        data.len()
                    ));
                }
                one(B::float_from_data(
                    TensorData::new(data.to_vec(), shape),
                    &dev,
                ))
            }
            OpCode::FROM_I64 => {
                let (data, shape) = (a.ints(0)?, a.usizes(1)?);
                if data.len() != shape.iter().product::<usize>() {
                    return Err(format!(
                        "op from_i64: {} values do not fill shape {shape:?}",
                        data.len()
                    ));
                }
                let td = TensorData::new(data.to_vec(), shape)
                    .convert_dtype(self.settings().int_dtype.into());
                Ok(vec![Value::Int(B::int_from_data(td, &dev))])
            }
            OpCode::RESHAPE => {
                Self::n_inputs(op, inputs, 1..=1)?;
                let v = self.get(inputs[0])?.clone();
                let shape = resolve_reshape(op, &v.shape(), a.ints(0)?)?;
                Ok(vec![Self::reshape_value(v, shape)?])
            }
            OpCode::PERMUTE => {
                let t = x(0)?;
                let dims = a.usizes(0)?;
                let mut sorted = dims.clone();
                sorted.sort_unstable();
                if sorted != (0..shape_of::<B>(&t).len()).collect::<Vec<_>>() {
                    return Err(format!(
                        "op permute: {dims:?} is not a permutation of the {} dims",
                        shape_of::<B>(&t).len()
                    ));
                }
                one(B::float_permute(t, &dims))
            }
            OpCode::TRANSPOSE => {
                let t = x(0)?;
                let r = shape_of::<B>(&t).len();
                let (d0, d1) = (a.usize(0)?, a.usize(1)?);
                check_dim(op, d0, r)?;
                check_dim(op, d1, r)?;
                one(B::float_swap_dims(t, d0, d1))
            }
            OpCode::NARROW => {
                Self::n_inputs(op, inputs, 1..=1)?;
                let v = self.get(inputs[0])?.clone();
                Ok(vec![self.narrow_value(
                    v,
                    a.usize(0)?,
                    a.usize(1)?,
                    a.usize(2)?,
                )?])
            }
            OpCode::CAT | OpCode::STACK => {
                if inputs.is_empty() {
                    return Err(format!("op {}: no tensors given", op.name()));
                }
                let dim = a.usize(0)?;
                let mut ts = inputs
                    .iter()
                    .map(|&i| self.float(i))
                    .collect::<RtResult<Vec<_>>>()?;
                if op == OpCode::STACK {
                    ts = ts
                        .into_iter()
                        .map(|t| {
                            let mut s = shape_of::<B>(&t);
                            check_dim(op, dim, s.len() + 1)?;
                            s.insert(dim, 1);
                            Ok(B::float_reshape(t, Shape::from(s)))
                        })
                        .collect::<RtResult<_>>()?;
                }
                let first = shape_of::<B>(&ts[0]);
                check_dim(op, dim, first.len())?;
                for t in &ts[1..] {
                    let s = shape_of::<B>(t);
                    let same = s.len() == first.len()
                        && s.iter()
                            .zip(&first)
                            .enumerate()
                            .all(|(i, (p, q))| i == dim || p == q);
                    if !same {
                        return Err(format!(
                            "op {}: shapes {first:?} and {s:?} differ outside dimension {dim}",
                            op.name()
                        ));
                    }
                }
                one(B::float_cat(ts, dim))
            }
            OpCode::CHUNK => {
                Self::n_inputs(op, inputs, 1..=1)?;
                let v = self.get(inputs[0])?.clone();
                let (chunks, dim) = (a.usize(0)?, a.usize(1)?);
                let shape = v.shape();
                check_dim(op, dim, shape.len())?;
                if chunks == 0 {
                    return Err("op chunk: zero chunks".into());
                }
                let size = shape[dim].div_ceil(chunks).max(1);
                (0..shape[dim])
                    .step_by(size)
                    .map(|s| self.narrow_value(v.clone(), dim, s, size.min(shape[dim] - s)))
                    .collect()
            }
            OpCode::EXPAND => {
                Self::n_inputs(op, inputs, 1..=1)?;
                let v = self.get(inputs[0])?.clone();
                let target = a.usizes(0)?;
                let from = v.shape();
                if target.len() < from.len()
                    || broadcast_shape(&from, &target).ok().as_ref() != Some(&target)
                {
                    return Err(format!("op expand: cannot expand {from:?} to {target:?}"));
                }
                let padded: Vec<usize> = std::iter::repeat_n(1, target.len() - from.len())
                    .chain(from)
                    .collect();
                let v = Self::reshape_value(v, padded)?;
                let s = Shape::from(target);
                Ok(vec![match v {
                    Value::Float(t) => Value::Float(B::float_expand(t, s)),
                    Value::Int(t) => Value::Int(B::int_expand(t, s)),
                    Value::Bool(t) => Value::Bool(B::bool_expand(t, s)),
                    Value::Grads(_) => return Err("op expand: not a tensor".into()),
                }])
            }
            OpCode::INDEX_SELECT => {
                Self::n_inputs(op, inputs, 2..=2)?;
                let (t, idx) = (x(0)?, self.int(inputs[1])?);
                let dim = a.usize(0)?;
                check_dim(op, dim, shape_of::<B>(&t).len())?;
                let n: usize = idx.shape().num_elements();
                let idx = B::int_reshape(idx, Shape::from(vec![n]));
                one(B::float_select(t, dim, idx))
            }
            OpCode::GATHER => {
                Self::n_inputs(op, inputs, 2..=2)?;
                let (t, idx) = (x(0)?, self.int(inputs[1])?);
                let dim = a.usize(0)?;
                let (ts, is) = (shape_of::<B>(&t), idx.shape().to_vec());
                check_dim(op, dim, ts.len())?;
                if ts.len() != is.len() {
                    return Err(format!(
                        "op gather: index rank {} differs from input rank {}",
                        is.len(),
                        ts.len()
                    ));
                }
                one(B::float_gather(dim, t, idx))
            }
            OpCode::PAD => {
                let t = x(0)?;
                let (pads, value) = (a.usizes(0)?, a.float(1)?);
                let shape = shape_of::<B>(&t);
                if pads.len() % 2 != 0 || pads.len() / 2 > shape.len() {
                    return Err(format!(
                        "op pad: {} pad values for rank {}",
                        pads.len(),
                        shape.len()
                    ));
                }
                let mut out = shape.clone();
                let mut slices = full_slices(shape.len());
                for (k, p) in pads.chunks(2).enumerate() {
                    let d = shape.len() - 1 - k;
                    out[d] += p[0] + p[1];
                    slices[d] = Slice {
                        start: p[0] as isize,
                        end: Some((p[0] + shape[d]) as isize),
                        step: 1,
                    };
                }
                let base = B::float_full(
                    Shape::from(out),
                    Scalar::Float(value),
                    &dev,
                    t.dtype().into(),
                );
                one(B::float_slice_assign(base, &slices, t))
            }
            OpCode::ADD | OpCode::SUB | OpCode::MUL | OpCode::DIV | OpCode::POW => {
                Self::n_inputs(op, inputs, 1..=2)?;
                if inputs.len() == 1 {
                    let (t, s) = (x(0)?, Scalar::Float(a.float(0)?));
                    return one(match op {
                        OpCode::ADD => B::float_add_scalar(t, s),
                        OpCode::SUB => B::float_sub_scalar(t, s),
                        OpCode::MUL => B::float_mul_scalar(t, s),
                        OpCode::DIV => B::float_div_scalar(t, s),
                        _ => B::float_powf_scalar(t, s),
                    });
                }
                let (l, r) = align::<B>(x(0)?, x(1)?)?;
                one(match op {
                    OpCode::ADD => B::float_add(l, r),
                    OpCode::SUB => B::float_sub(l, r),
                    OpCode::MUL => B::float_mul(l, r),
                    OpCode::DIV => B::float_div(l, r),
                    _ => B::float_powf(l, r),
                })
            }
            OpCode::NEG => one(B::float_neg(x(0)?)),
            OpCode::EXP => one(B::float_exp(x(0)?)),
            OpCode::LOG => one(B::float_log(x(0)?)),
            OpCode::SQRT => one(B::float_sqrt(x(0)?)),
            OpCode::RSQRT => one(B::float_recip(B::float_sqrt(x(0)?))),
            OpCode::ABS => one(B::float_abs(x(0)?)),
            OpCode::SIN => one(B::float_sin(x(0)?)),
            OpCode::COS => one(B::float_cos(x(0)?)),
            OpCode::TANH => one(B::float_tanh(x(0)?)),
            OpCode::SIGMOID => one(B::sigmoid(x(0)?)),
            OpCode::SILU => {
                let t = x(0)?;
                one(B::float_mul(t.clone(), B::sigmoid(t)))
            }
            OpCode::QUICK_GELU => {
                let t = x(0)?;
                one(B::float_mul(
                    t.clone(),
                    B::sigmoid(B::float_mul_scalar(t, Scalar::Float(1.702))),
                ))
            }
            OpCode::GELU => {
                let t = x(0)?;
                match a.str(0)? {
                    "none" => one(B::gelu(t)),
                    "tanh" => {
                        // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                        let cube = B::float_powf_scalar(t.clone(), Scalar::Float(3.0));
                        let inner = B::float_add(
                            t.clone(),
                            B::float_mul_scalar(cube, Scalar::Float(0.044715)),
                        );
                        let th = B::float_tanh(B::float_mul_scalar(
                            inner,
                            Scalar::Float((2.0 / std::f64::consts::PI).sqrt()),
                        ));
                        let g = B::float_mul_scalar(
                            B::float_add_scalar(th, Scalar::Float(1.0)),
                            Scalar::Float(0.5),
                        );
                        one(B::float_mul(t, g))
                    }
                    other => Err(format!(
                        "op gelu: unknown approximation `{other}` (use none or tanh)"
                    )),
                }
            }
            OpCode::RELU => one(B::relu(x(0)?)),
            OpCode::CLAMP => {
                let t = x(0)?;
                one(match (a.opt_float(0)?, a.opt_float(1)?) {
                    (Some(lo), Some(hi)) => B::float_clamp(t, Scalar::Float(lo), Scalar::Float(hi)),
                    (Some(lo), None) => B::float_clamp_min(t, Scalar::Float(lo)),
                    (None, Some(hi)) => B::float_clamp_max(t, Scalar::Float(hi)),
                    (None, None) => t,
                })
            }
            OpCode::GT | OpCode::GE | OpCode::LT | OpCode::LE | OpCode::EQ => {
                Self::n_inputs(op, inputs, 1..=2)?;
                let out = if inputs.len() == 1 {
                    let (t, s) = (x(0)?, Scalar::Float(a.float(0)?));
                    match op {
                        OpCode::GT => B::float_greater_elem(t, s, bool_dt),
                        OpCode::GE => B::float_greater_equal_elem(t, s, bool_dt),
                        OpCode::LT => B::float_lower_elem(t, s, bool_dt),
                        OpCode::LE => B::float_lower_equal_elem(t, s, bool_dt),
                        _ => B::float_equal_elem(t, s, bool_dt),
                    }
                } else {
                    let (l, r) = align::<B>(x(0)?, x(1)?)?;
                    let target =
                        Shape::from(broadcast_shape(&shape_of::<B>(&l), &shape_of::<B>(&r))?);
                    let (l, r) = (
                        B::float_expand(l, target.clone()),
                        B::float_expand(r, target),
                    );
                    match op {
                        OpCode::GT => B::float_greater(l, r, bool_dt),
                        OpCode::GE => B::float_greater_equal(l, r, bool_dt),
                        OpCode::LT => B::float_lower(l, r, bool_dt),
                        OpCode::LE => B::float_lower_equal(l, r, bool_dt),
                        _ => B::float_equal(l, r, bool_dt),
                    }
                };
                Ok(vec![Value::Bool(out)])
            }
            OpCode::WHERE => {
                Self::n_inputs(op, inputs, 3..=3)?;
                let (c, t, f) = (self.bool(inputs[0])?, x(1)?, x(2)?);
                let cs = c.shape().to_vec();
                let target = broadcast_shape(
                    &broadcast_shape(&cs, &shape_of::<B>(&t))?,
                    &shape_of::<B>(&f),
                )?;
                let r = target.len();
                let s = Shape::from(target);
                let c = B::bool_reshape(
                    c,
                    Shape::from(
                        std::iter::repeat_n(1, r - cs.len())
                            .chain(cs)
                            .collect::<Vec<_>>(),
                    ),
                );
                let c = B::bool_expand(c, s.clone());
                let t = B::float_expand(to_rank::<B>(t, r), s.clone());
                let f = B::float_expand(to_rank::<B>(f, r), s);
                // mask_where(tensor, mask, value) takes `value` where the mask is set.
                one(B::float_mask_where(f, c, t))
            }
            OpCode::SUM | OpCode::MEAN | OpCode::MAX => {
                let t = x(0)?;
                one(self.reduce(op, t, &a.usizes(0)?, a.boolean(1)?)?)
            }
            OpCode::VAR => {
                let t = x(0)?;
                one(self.variance(t, &a.usizes(0)?, a.boolean(1)?, a.usize(2)?)?)
            }
            OpCode::MATMUL => {
                let (l, r) = (x(0)?, x(1)?);
                let (ls, rs) = (shape_of::<B>(&l), shape_of::<B>(&r));
                if ls.len() < 2 || rs.len() < 2 || ls[ls.len() - 1] != rs[rs.len() - 2] {
                    return Err(format!(
                        "op matmul: shapes {ls:?} and {rs:?} do not multiply"
                    ));
                }
                broadcast_shape(&ls[..ls.len() - 2], &rs[..rs.len() - 2])?;
                let r_ = ls.len().max(rs.len());
                one(B::float_matmul(to_rank::<B>(l, r_), to_rank::<B>(r, r_)))
            }
            OpCode::LINEAR => {
                Self::n_inputs(op, inputs, 2..=3)?;
                let (t, w) = (x(0)?, x(1)?);
                let (ts, ws) = (shape_of::<B>(&t), shape_of::<B>(&w));
                if ws.len() != 2 || ts.last() != Some(&ws[1]) {
                    return Err(format!(
                        "op linear: input {ts:?} does not match weight {ws:?} ([out, in])"
                    ));
                }
                let b = if inputs.len() == 3 { Some(x(2)?) } else { None };
                if let Some(b) = &b
                    && shape_of::<B>(b) != [ws[0]]
                {
                    return Err(format!(
                        "op linear: bias {:?} does not match {} outputs",
                        shape_of::<B>(b),
                        ws[0]
                    ));
                }
                one(B::linear(t, B::float_swap_dims(w, 0, 1), b))
            }
            OpCode::CONV2D | OpCode::CONV_TRANSPOSE2D => {
                Self::n_inputs(op, inputs, 2..=3)?;
                let (t, w) = (x(0)?, x(1)?);
                let b = if inputs.len() == 3 { Some(x(2)?) } else { None };
                let (ts, ws) = (shape_of::<B>(&t), shape_of::<B>(&w));
                let transposed = op == OpCode::CONV_TRANSPOSE2D;
                let (stride, padding) = (a.pair(0)?, a.pair(1)?);
                let (dilation, groups) = if transposed {
                    (a.pair(3)?, a.usize(4)?)
                } else {
                    (a.pair(2)?, a.usize(3)?)
                };
                if stride.contains(&0) || dilation.contains(&0) || groups == 0 {
                    return Err(format!(
                        "op {}: stride, dilation and groups must be positive",
                        op.name()
                    ));
                }
                let in_ch = if transposed {
                    ws.first().copied()
                } else {
                    ws.get(1).map(|c| c * groups)
                };
                if ts.len() != 4 || ws.len() != 4 || in_ch != Some(ts[1]) {
                    return Err(format!(
                        "op {}: input {ts:?} does not match weight {ws:?} (groups {groups})",
                        op.name()
                    ));
                }
                if transposed {
                    let opts =
                        ConvTransposeOptions::new(stride, padding, a.pair(2)?, dilation, groups);
                    one(B::conv_transpose2d(t, w, b, opts))
                } else {
                    one(B::conv2d(
                        t,
                        w,
                        b,
                        ConvOptions::new(stride, padding, dilation, groups),
                    ))
                }
            }
            OpCode::GROUP_NORM => {
                let t = x(0)?;
                let (groups, eps) = (a.usize(0)?, a.float(1)?);
                let (w, b) = self.norm_params(inputs, &a, 2)?;
                let shape = shape_of::<B>(&t);
                if shape.len() < 2 || groups == 0 || !shape[1].is_multiple_of(groups) {
                    return Err(format!(
                        "op group_norm: {groups} groups do not divide the channels of {shape:?}"
                    ));
                }
                let g = B::float_reshape(
                    t,
                    Shape::from(vec![
                        shape[0],
                        groups,
                        shape[1..].iter().product::<usize>() / groups,
                    ]),
                );
                let n = self.normalize_last(g, eps)?;
                let n = B::float_reshape(n, Shape::from(shape));
                one(self.channel_affine(n, w, b, 1)?)
            }
            OpCode::LAYER_NORM | OpCode::RMS_NORM => {
                let t = x(0)?;
                let eps = a.float(0)?;
                let (w, b) = self.norm_params(inputs, &a, 1)?;
                let last = shape_of::<B>(&t).len() - 1;
                let n = if op == OpCode::LAYER_NORM {
                    self.normalize_last(t, eps)?
                } else {
                    let ms = self.reduce(
                        OpCode::MEAN,
                        B::float_mul(t.clone(), t.clone()),
                        &[last],
                        true,
                    )?;
                    B::float_mul(
                        t,
                        B::float_recip(B::float_sqrt(B::float_add_scalar(ms, Scalar::Float(eps)))),
                    )
                };
                one(self.channel_affine(n, w, b, last)?)
            }
            OpCode::SOFTMAX => {
                let t = x(0)?;
                let dim = a.usize(0)?;
                check_dim(op, dim, shape_of::<B>(&t).len())?;
                one(B::softmax(t, dim))
            }
            OpCode::ATTENTION => {
                Self::n_inputs(op, inputs, 3..=4)?;
                let (q, k, v) = (x(0)?, x(1)?, x(2)?);
                let (qs, ks, vs) = (shape_of::<B>(&q), shape_of::<B>(&k), shape_of::<B>(&v));
                if qs.len() != 4
                    || ks.len() != 4
                    || vs.len() != 4
                    || qs[3] != ks[3]
                    || ks[2] != vs[2]
                {
                    return Err(format!(
                        "op attention: q {qs:?}, k {ks:?}, v {vs:?} must be [B, H, L, D] and agree"
                    ));
                }
                let (mut mask, mut bias) = (None, None);
                if let Some(&m) = inputs.get(3) {
                    let target = Shape::from(vec![qs[0], qs[1], qs[2], ks[2]]);
                    match self.get(m)?.clone() {
                        Value::Bool(b) => mask = Some(B::bool_expand(b, target)),
                        Value::Float(f) => bias = Some(B::float_expand(to_rank::<B>(f, 4), target)),
                        other => return Err(format!("op attention: mask is a {}", other.kind())),
                    }
                }
                let opts = AttentionModuleOptions {
                    scale: a.opt_float(0)?,
                    ..Default::default()
                };
                // burn-autodiff always decomposes attention (materialising the scores); when no
                // gradient is wanted, the backend's own fused kernel (flash on flex) can run.
                let tracked = [&q, &k, &v]
                    .into_iter()
                    .chain(bias.as_ref())
                    .any(B::is_tracked);
                if tracked {
                    return one(B::attention(q, k, v, mask, bias, opts));
                }
                let out =
                    <B::InnerBackend as burn_backend::ops::ModuleOps<B::InnerBackend>>::attention(
                        B::inner(q),
                        B::inner(k),
                        B::inner(v),
                        mask.map(B::bool_inner),
                        bias.map(B::inner),
                        opts,
                    );
                one(B::from_inner(out))
            }
            OpCode::INTERPOLATE => {
                let t = x(0)?;
                let size = a.pair(0)?;
                let mode = match a.str(1)? {
                    "nearest" => InterpolateMode::Nearest,
                    "bilinear" => InterpolateMode::Bilinear,
                    other => {
                        return Err(format!(
                            "op interpolate: unknown mode `{other}` (use nearest or bilinear)"
                        ));
                    }
                };
                if shape_of::<B>(&t).len() != 4 {
                    return Err("op interpolate: input must be [N, C, H, W]".into());
                }
                one(B::interpolate(
                    t,
                    size,
                    InterpolateOptions::new(mode).with_align_corners(false),
                ))
            }
            OpCode::DROPOUT => {
                let t = x(0)?;
                let p = a.float(0)?;
                if !(0.0..1.0).contains(&p) {
                    return Err(format!("op dropout: probability {p} outside [0, 1)"));
                }
                if p == 0.0 {
                    return one(t);
                }
                let keep = B::float_random(
                    t.shape(),
                    Distribution::Bernoulli(1.0 - p),
                    &dev,
                    t.dtype().into(),
                );
                let keep = B::float_detach(keep);
                one(B::float_mul_scalar(
                    B::float_mul(t, keep),
                    Scalar::Float(1.0 / (1.0 - p)),
                ))
            }
            OpCode::EMBEDDING => {
                Self::n_inputs(op, inputs, 2..=2)?;
                let (w, ids) = (x(0)?, self.int(inputs[1])?);
                let ws = shape_of::<B>(&w);
                if ws.len() != 2 {
                    return Err(format!(
                        "op embedding: weight must be [vocab, dim], got {ws:?}"
                    ));
                }
                let mut out = ids.shape().to_vec();
                let n: usize = out.iter().product();
                let flat = B::int_reshape(ids, Shape::from(vec![n]));
                out.push(ws[1]);
                one(B::float_reshape(
                    B::float_select(w, 0, flat),
                    Shape::from(out),
                ))
            }
            OpCode::CAST => {
                Self::n_inputs(op, inputs, 1..=1)?;
                let dt = a.dtype(0)?;
                let v = self.get(inputs[0])?.clone();
                Ok(vec![match (v, dt.is_float()) {
                    (Value::Float(t), true) => Value::Float(B::float_cast(t, float_dtype(dt)?)),
                    (Value::Float(t), false) if dt == DType::Bool => {
                        Value::Bool(B::float_not_equal_elem(t, Scalar::Float(0.0), bool_dt))
                    }
                    (Value::Float(t), false) => {
                        Value::Int(B::float_into_int(t, self.settings().int_dtype))
                    }
                    (Value::Int(t), true) => Value::Float(B::int_into_float(t, float_dtype(dt)?)),
                    (Value::Bool(t), true) => Value::Float(B::bool_into_float(t, float_dtype(dt)?)),
                    (Value::Int(t), false) if dt != DType::Bool => Value::Int(t),
                    (v, _) => return Err(format!("op cast: cannot cast a {} to {dt}", v.kind())),
                }])
            }
            OpCode::TO_DEVICE => {
                let t = x(0)?;
                let name = a.str(0)?;
                if name != self.device_name {
                    return Err(format!(
                        "op to_device: this run computes on `{}`; moving to `{name}` is not supported",
                        self.device_name
                    ));
                }
                one(t)
            }
            OpCode::DETACH => one(B::float_detach(x(0)?)),
            OpCode::SET_REQUIRES_GRAD => {
                Self::n_inputs(op, inputs, 1..=1)?;
                let t = B::float_set_require_grad(x(0)?, a.boolean(0)?);
                self.replace(inputs[0], Value::Float(t))?;
                Ok(vec![])
            }
            OpCode::BACKWARD => {
                let t = x(0)?;
                if t.shape().num_elements() != 1 {
                    return Err(format!(
                        "op backward: the loss must have one element, got shape {:?}",
                        shape_of::<B>(&t)
                    ));
                }
                Ok(vec![Value::Grads(Arc::new(Mutex::new(B::backward(t))))])
            }
            OpCode::GRAD => {
                Self::n_inputs(op, inputs, 2..=2)?;
                let grads = match self.get(inputs[0])? {
                    Value::Grads(g) => g.clone(),
                    other => {
                        return Err(format!(
                            "op grad: first input is a {}, not gradients",
                            other.kind()
                        ));
                    }
                };
                let p = x(1)?;
                let grads = grads.lock().unwrap_or_else(|e| e.into_inner());
                Ok(B::grad(&p, &grads)
                    .map(|g| Value::Float(B::from_inner(g)))
                    .into_iter()
                    .collect())
            }
            OpCode::ASSIGN => {
                Self::n_inputs(op, inputs, 2..=2)?;
                let (dst, src) = (x(0)?, x(1)?);
                if shape_of::<B>(&dst) != shape_of::<B>(&src) {
                    return Err(format!(
                        "op assign: shape {:?} into {:?}",
                        shape_of::<B>(&src),
                        shape_of::<B>(&dst)
                    ));
                }
                let trainable = B::float_is_require_grad(&dst);
                let new = B::float_set_require_grad(B::float_detach(src), trainable);
                self.replace(inputs[0], Value::Float(new))?;
                Ok(vec![])
            }
            other => Err(format!(
                "op code {} is not known to this host (plugin built against a newer plugin-api?)",
                other.0
            )),
        }
    }
}

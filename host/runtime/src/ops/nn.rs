//! The fused network ops: matmul and linear, convolutions, norms, softmax, attention,
//! interpolation, dropout, embedding.

use burn_backend::{
    Distribution, Scalar, Shape, TensorMetadata,
    ops::{
        AttentionModuleOptions, ConvOptions, ConvTransposeOptions, InterpolateMode,
        InterpolateOptions,
    },
};
use ferrite_plugin_api::{TensorId, op};

use crate::autocast::{self, back, to};

use super::{
    F, RtResult, TensorTable, Tracking, Value, broadcast_shape, check_dim, last_dim, one, shape_of,
    to_rank,
};

/// Input, weight (as kept) and optional bias.
type ConvInputs<B> = (F<B>, Value<B>, Option<F<B>>);

/// `x · w + b` for `w` `[in, out]` (the weight's transposed view) as one 2-D matmul over x's
/// rows: burn's linear reshapes the weight to x's rank, and reshaping a transposed view copies
/// the whole weight on every call (flex's 2-D matmul reads the view's strides as they are).
fn linear_2d<B: Tracking>(x: F<B>, w: F<B>, b: Option<F<B>>) -> F<B> {
    let (mut shape, ws) = (shape_of::<B>(&x), shape_of::<B>(&w));
    let rows = shape[..shape.len() - 1].iter().product::<usize>();
    let y = B::float_matmul(B::float_reshape(x, Shape::from(vec![rows, ws[0]])), w);
    let y = match b {
        Some(b) => B::float_add(y, B::float_reshape(b, Shape::from(vec![1, ws[1]]))),
        None => y,
    };
    *shape
        .last_mut()
        .expect("checked: x has the weight's input width") = ws[1];
    B::float_reshape(y, Shape::from(shape))
}

impl<B: Tracking> TensorTable<B> {
    pub(super) fn matmul(&self, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let (l, r) = (self.f(ids, 0)?, self.f(ids, 1)?);
        let (ls, rs) = (shape_of::<B>(&l), shape_of::<B>(&r));
        if ls.len() < 2 || rs.len() < 2 || ls[ls.len() - 1] != rs[rs.len() - 2] {
            return Err(format!(
                "op matmul: shapes {ls:?} and {rs:?} do not multiply"
            ));
        }
        broadcast_shape(&ls[..ls.len() - 2], &rs[..rs.len() - 2])?;
        let rank = ls.len().max(rs.len());
        let dt = autocast::promoted::<B>(self.compute_dtype(), [&l, &r]);
        one(autocast::matmul::<B>(
            to_rank::<B>(l, rank),
            to_rank::<B>(r, rank),
            dt,
        ))
    }

    pub(super) fn linear(&self, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let (t, b) = (self.f(ids, 0)?, self.opt_f(ids, 2)?);
        let weight = self.get_kept(ids[1])?;
        let (ts, ws) = (shape_of::<B>(&t), weight.shape());
        if ws.len() != 2 || ts.last() != Some(&ws[1]) {
            return Err(format!(
                "op linear: input {ts:?} does not match weight {ws:?} ([out, in])"
            ));
        }
        if let Some(b) = &b
            && shape_of::<B>(b) != [ws[0]]
        {
            return Err(format!(
                "op linear: bias {:?} does not match {} outputs",
                shape_of::<B>(b),
                ws[0]
            ));
        }
        let dt = self.compute_dtype();
        match weight {
            // Backward keeps the kept weight, not an f32 copy of it.
            Value::Kept(k) => one(B::kept_linear(t, k, b, self.settings().int_dtype, dt)),
            _ => {
                let w = B::float_swap_dims(self.f(ids, 1)?, 0, 1);
                let dt = autocast::promoted::<B>(dt, [&t, &w].into_iter().chain(b.as_ref()));
                let y = linear_2d::<B>(to::<B>(t, dt), to::<B>(w, dt), b.map(|b| to::<B>(b, dt)));
                one(back::<B>(y, dt))
            }
        }
    }

    /// Input, weight and bias of a convolution, checked against each other.
    fn conv_inputs(
        &self,
        op: &str,
        ids: &[TensorId],
        stride: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        transposed: bool,
    ) -> RtResult<ConvInputs<B>> {
        let (t, w, b) = (self.f(ids, 0)?, self.get_kept(ids[1])?, self.opt_f(ids, 2)?);
        let (ts, ws) = (shape_of::<B>(&t), w.shape());
        if stride.contains(&0) || dilation.contains(&0) || groups == 0 {
            return Err(format!(
                "op {op}: stride, dilation and groups must be positive"
            ));
        }
        let in_ch = if transposed {
            ws.first().copied()
        } else {
            ws.get(1).map(|c| c * groups)
        };
        if ts.len() != 4 || ws.len() != 4 || in_ch != Some(ts[1]) {
            return Err(format!(
                "op {op}: input {ts:?} does not match weight {ws:?} (groups {groups})"
            ));
        }
        let out_ch = if transposed { ws[1] * groups } else { ws[0] };
        if let Some(bs) = b.as_ref().map(shape_of::<B>).filter(|s| *s != [out_ch]) {
            return Err(format!(
                "op {op}: bias {bs:?} does not match the {out_ch} output channels of weight {ws:?}"
            ));
        }
        Ok((t, w, b))
    }

    pub(super) fn conv2d(&self, ids: &[TensorId], a: &op::Conv) -> RtResult<Vec<Value<B>>> {
        let (t, w, b) = self.conv_inputs("conv2d", ids, a.stride, a.dilation, a.groups, false)?;
        let (ts, ws) = (shape_of::<B>(&t), w.shape());
        for i in 0..2 {
            let span = a.dilation[i] * ws[2 + i].saturating_sub(1) + 1;
            if ws[2 + i] == 0 || ts[2 + i] + 2 * a.padding[i] < span {
                return Err(format!(
                    "op conv2d: weight {ws:?} (dilation {:?}) does not fit input {ts:?} padded by \
                     {:?}: the output would be empty",
                    a.dilation, a.padding
                ));
            }
        }
        let opts = ConvOptions::new(a.stride, a.padding, a.dilation, a.groups);
        let dt = self.compute_dtype();
        let w = match w {
            // Backward keeps the kept kernel, not an f32 copy of it.
            Value::Kept(k) => {
                let int = self.settings().int_dtype;
                return one(B::kept_conv2d(t, k, b, opts, int, dt));
            }
            other => self.as_float("conv2d", other)?,
        };
        let dt = autocast::promoted::<B>(dt, [&t, &w].into_iter().chain(b.as_ref()));
        let y = B::conv2d_fused(
            to::<B>(t, dt),
            to::<B>(w, dt),
            b.map(|b| to::<B>(b, dt)),
            opts,
        );
        one(back::<B>(y, dt))
    }

    pub(super) fn conv_transpose2d(
        &self,
        ids: &[TensorId],
        a: &op::ConvTranspose,
    ) -> RtResult<Vec<Value<B>>> {
        let (t, w, b) = self.conv_inputs(
            "conv_transpose2d",
            ids,
            a.stride,
            a.dilation,
            a.groups,
            true,
        )?;
        let opts =
            ConvTransposeOptions::new(a.stride, a.padding, a.output_padding, a.dilation, a.groups);
        let w = self.as_float("conv_transpose2d", w)?;
        let dt =
            autocast::promoted::<B>(self.compute_dtype(), [&t, &w].into_iter().chain(b.as_ref()));
        let y = B::conv_transpose2d(
            to::<B>(t, dt),
            to::<B>(w, dt),
            b.map(|b| to::<B>(b, dt)),
            opts,
        );
        one(back::<B>(y, dt))
    }

    /// A weight read as kept, as f32 (a kept one dequantised).
    fn as_float(&self, op: &str, v: Value<B>) -> RtResult<F<B>> {
        match v {
            Value::Float(t) => Ok(t),
            Value::Kept(k) => Ok(k.dequantize(self.settings().int_dtype)),
            other => Err(format!("op {op}: the weight is a {}", other.kind())),
        }
    }

    /// Multiplies by the weight and adds the bias, both per channel of `channel_dim`.
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

    pub(super) fn group_norm(
        &self,
        ids: &[TensorId],
        a: &op::GroupNorm,
    ) -> RtResult<Vec<Value<B>>> {
        let t = self.f(ids, 0)?;
        let (w, b) = (self.opt_f(ids, 1)?, self.opt_f(ids, 2)?);
        let groups = a.groups;
        let shape = shape_of::<B>(&t);
        check_groups("group_norm", &shape, groups)?;
        let g = B::float_reshape(
            t,
            Shape::from(vec![
                shape[0],
                groups,
                shape[1..].iter().product::<usize>() / groups,
            ]),
        );
        let n = self.normalize_last(g, a.eps)?;
        let n = B::float_reshape(n, Shape::from(shape));
        one(self.channel_affine(n, w, b, 1)?)
    }

    pub(super) fn group_norm_silu(
        &self,
        ids: &[TensorId],
        a: &op::GroupNorm,
    ) -> RtResult<Vec<Value<B>>> {
        let t = self.f(ids, 0)?;
        let (w, b) = (self.opt_f(ids, 1)?, self.opt_f(ids, 2)?);
        let shape = shape_of::<B>(&t);
        check_groups("group_norm_silu", &shape, a.groups)?;
        // Any shape of C values, as group_norm takes them.
        let channels = |p: Option<F<B>>| {
            p.map(|p| {
                let ps = shape_of::<B>(&p);
                if ps.iter().product::<usize>() != shape[1] {
                    return Err(format!(
                        "op group_norm_silu: parameter of shape {ps:?} does not match {} channels",
                        shape[1]
                    ));
                }
                Ok(B::float_reshape(p, Shape::from(vec![shape[1]])))
            })
            .transpose()
        };
        let (w, b) = (channels(w)?, channels(b)?);
        one(B::group_norm_silu(t, a.groups, w, b, a.eps))
    }

    pub(super) fn layer_norm(&self, ids: &[TensorId], eps: f64) -> RtResult<Vec<Value<B>>> {
        let t = self.f(ids, 0)?;
        let (w, b) = (self.opt_f(ids, 1)?, self.opt_f(ids, 2)?);
        let last = last_dim::<B>("layer_norm", &t)?;
        let n = self.normalize_last(t, eps)?;
        one(self.channel_affine(n, w, b, last)?)
    }

    pub(super) fn rms_norm(&self, ids: &[TensorId], eps: f64) -> RtResult<Vec<Value<B>>> {
        let t = self.f(ids, 0)?;
        let w = self.opt_f(ids, 1)?;
        let last = last_dim::<B>("rms_norm", &t)?;
        let ms = Self::mean_over(B::float_mul(t.clone(), t.clone()), &[last])?;
        let n = B::float_mul(
            t,
            B::float_recip(B::float_sqrt(B::float_add_scalar(ms, Scalar::Float(eps)))),
        );
        one(self.channel_affine(n, w, None, last)?)
    }

    pub(super) fn softmax(&self, id: TensorId, dim: usize) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        check_dim("softmax", dim, shape_of::<B>(&t).len())?;
        one(B::softmax(t, dim))
    }

    pub(super) fn attention(&self, ids: &[TensorId], a: &op::Attention) -> RtResult<Vec<Value<B>>> {
        let (q, k, v) = (self.f(ids, 0)?, self.f(ids, 1)?, self.f(ids, 2)?);
        let (qs, ks, vs) = (shape_of::<B>(&q), shape_of::<B>(&k), shape_of::<B>(&v));
        if qs.len() != 4
            || ks.len() != 4
            || vs.len() != 4
            || qs[..2] != ks[..2]
            || ks[..2] != vs[..2]
            || qs[3] != ks[3]
            || ks[2] != vs[2]
        {
            return Err(format!(
                "op attention: q {qs:?}, k {ks:?}, v {vs:?} must be [B, H, L, D] and agree"
            ));
        }
        let (mut mask, mut bias) = (None, None);
        if let Some(&m) = ids.get(3).filter(|&&m| m != TensorId::NONE) {
            let target = Shape::from(vec![qs[0], qs[1], qs[2], ks[2]]);
            match self.get(m)? {
                Value::Bool(b) => mask = Some(B::bool_expand(b, target)),
                Value::Float(f) => bias = Some(B::float_expand(to_rank::<B>(f, 4), target)),
                other => return Err(format!("op attention: mask is a {}", other.kind())),
            }
        }
        let opts = AttentionModuleOptions {
            scale: a.scale,
            ..Default::default()
        };
        // burn-autodiff always decomposes attention (materialising the scores): in training,
        // unmasked attention is the runtime's own O(L) op; when no gradient is wanted, the
        // backend's own fused kernel (flash on flex) can run.
        let tracked = [&q, &k, &v]
            .into_iter()
            .chain(bias.as_ref())
            .any(B::is_tracked);
        // The O(L) op takes q, k and v of one batch and head count (no broadcasting) and no
        // empty dimension (burn's handles those).
        let plain = qs[..2] == ks[..2]
            && ks[..2] == vs[..2]
            && !qs.contains(&0)
            && !ks.contains(&0)
            && !vs.contains(&0);
        let dt = self.compute_dtype();
        if tracked && mask.is_none() && bias.is_none() && plain {
            let scale = a.scale.unwrap_or(1.0 / (qs[3] as f64).sqrt());
            return one(B::memory_efficient_attention(q, k, v, scale, dt));
        }
        // Masked attention and attention without gradients compute in f32: burn's kernels
        // would take their softmax in the train dtype.
        if !tracked && mask.is_none() && bias.is_none() && plain {
            let scale = a.scale.unwrap_or(1.0 / (qs[3] as f64).sqrt());
            if let Some(out) = B::attention_no_grad(&q, &k, &v, scale) {
                return one(out);
            }
        }
        if tracked {
            return one(B::attention(q, k, v, mask, bias, opts));
        }
        let out = <B::InnerBackend as burn_backend::ops::ModuleOps<B::InnerBackend>>::attention(
            B::inner(q),
            B::inner(k),
            B::inner(v),
            mask.map(B::bool_inner),
            bias.map(B::inner),
            opts,
        );
        one(B::from_inner(out))
    }

    pub(super) fn interpolate(&self, id: TensorId, a: &op::Interpolate) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        let mode = match a.mode {
            op::InterpolateMode::Nearest => InterpolateMode::Nearest,
            op::InterpolateMode::Bilinear => InterpolateMode::Bilinear,
        };
        if shape_of::<B>(&t).len() != 4 {
            return Err("op interpolate: input must be [N, C, H, W]".into());
        }
        one(B::interpolate(
            t,
            a.size,
            InterpolateOptions::new(mode).with_align_corners(false),
        ))
    }

    pub(super) fn dropout(&self, id: TensorId, p: f64) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        if !(0.0..1.0).contains(&p) {
            return Err(format!("op dropout: probability {p} outside [0, 1)"));
        }
        if p == 0.0 {
            return one(t);
        }
        let keep = self.backend_random(|| {
            B::float_random(
                t.shape(),
                Distribution::Bernoulli(1.0 - p),
                &self.device,
                t.dtype().into(),
            )
        });
        let keep = B::float_detach(keep);
        one(B::float_mul_scalar(
            B::float_mul(t, keep),
            Scalar::Float(1.0 / (1.0 - p)),
        ))
    }

    pub(super) fn embedding(&self, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let (w, idx) = (self.f(ids, 0)?, self.int(ids[1])?);
        let ws = shape_of::<B>(&w);
        if ws.len() != 2 {
            return Err(format!(
                "op embedding: weight must be [vocab, dim], got {ws:?}"
            ));
        }
        let mut out = idx.shape().to_vec();
        let n: usize = out.iter().product();
        let flat = B::int_reshape(idx, Shape::from(vec![n]));
        out.push(ws[1]);
        one(B::float_reshape(
            B::float_select(w, 0, flat),
            Shape::from(out),
        ))
    }
}

/// That `groups` divides the channels (dimension 1) of an input of `shape`.
fn check_groups(op: &str, shape: &[usize], groups: usize) -> RtResult<()> {
    if shape.len() < 2 || groups == 0 || !shape[1].is_multiple_of(groups) {
        return Err(format!(
            "op {op}: {groups} groups do not divide the channels of {shape:?}"
        ));
    }
    Ok(())
}

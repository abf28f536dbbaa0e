//! Muon (Keller Jordan's `muon`, as OneTrainer's MUON runs it: `SingleDeviceMuonWithAuxAdam`):
//! the hidden layers' matrix parameters (conv kernels as `[out, in·kh·kw]`) step along the
//! orthogonalised Nesterov momentum — five quintic Newton–Schulz iterations, in bfloat16 as the
//! reference does — scaled by √max(1, rows/cols); every other parameter (vectors, and the
//! layers outside `hidden_layers`: embeddings, the first and last convs) takes the reference's
//! auxiliary Adam at `adam_lr`. Weight decay is decoupled in both. A parameter without a
//! gradient is skipped with its state kept, as Ferrite's other optimizers do.

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{Slots, write},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MuonOptions {
    /// Muon's momentum.
    pub momentum: f64,
    pub nesterov: bool,
    /// Newton–Schulz iterations.
    pub ns_steps: usize,
    /// Run them in bfloat16 as the reference does (each product and sum rounded to bf16);
    /// false: in float32.
    pub ns_bf16: bool,
    pub weight_decay: f64,
    /// OneTrainer's `muon_hidden_layers`: a parameter of two or more dimensions whose name holds
    /// one of these takes Muon, every other one Adam; empty: every one of two or more.
    pub hidden_layers: Vec<String>,
    /// The auxiliary Adam's learning rate (OneTrainer's `muon_adam_lr`), following the same
    /// schedule; none: the learning rate.
    pub adam_lr: Option<f64>,
    /// The part's learning rate, set by the host: the schedule's factor is `lr / learning_rate`.
    pub learning_rate: Option<f64>,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub adam_weight_decay: f64,
}

impl Default for MuonOptions {
    fn default() -> Self {
        // The reference's defaults (OneTrainer's too).
        Self {
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            ns_bf16: true,
            weight_decay: 0.0,
            // The hidden layers of every family's parameter names: UNet and DiT `*_blocks`,
            // T5's `block`, CLIP's `encoder.layers`.
            hidden_layers: vec!["block".into(), "layers".into()],
            adam_lr: None,
            learning_rate: None,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-10,
            adam_weight_decay: 0.0,
        }
    }
}

/// The quintic's coefficients (the reference's).
const NS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

pub struct Muon {
    opts: MuonOptions,
    slots: Slots,
}

impl Muon {
    /// `t` rounded to bfloat16 when the iterations run in it (computed in f32 then rounded, as
    /// torch's CPU kernels do for bf16).
    fn round(&self, t: Tensor) -> Result<Tensor> {
        if self.opts.ns_bf16 {
            t.cast(DType::BF16)?.cast(DType::F32)
        } else {
            Ok(t)
        }
    }

    /// The reference's `zeropower_via_newtonschulz5` on a matrix.
    fn orthogonalise(&self, g: &Tensor) -> Result<Tensor> {
        let (rows, cols) = (g.dim(0)?, g.dim(1)?);
        let tall = rows > cols;
        let mut x = self.round(if tall { g.transpose(0, 1)? } else { g.clone() })?;
        let norm = self.round(x.powf(2.0)?.sum_all()?.sqrt()?)?;
        x = self.round(x.div(&self.round(norm.add_scalar(1e-7)?)?)?)?;
        let (a, b, c) = NS;
        for _ in 0..self.opts.ns_steps {
            let xt = x.transpose(0, 1)?;
            let am = self.round(x.matmul(&xt)?)?;
            // `b * A + c * A @ A` is `b·A + (c·A) @ A` in Python.
            let caa = self.round(self.round(am.mul_scalar(c)?)?.matmul(&am)?)?;
            let bm = self.round(self.round(am.mul_scalar(b)?)?.add(&caa)?)?;
            x = self.round(
                self.round(x.mul_scalar(a)?)?
                    .add(&self.round(bm.matmul(&x)?)?)?,
            )?;
        }
        if tall { x.transpose(0, 1) } else { Ok(x) }
    }

    fn takes_muon(&self, name: &str, shape: &[usize]) -> bool {
        let hidden = &self.opts.hidden_layers;
        shape.len() >= 2 && (hidden.is_empty() || hidden.iter().any(|l| name.contains(l.as_str())))
    }

    /// Adam's rate at a step taken at `lr`: `adam_lr` times the schedule's factor.
    fn adam_rate(&self, lr: f64) -> f64 {
        match (self.opts.adam_lr, self.opts.learning_rate) {
            (Some(adam), Some(base)) if base > 0.0 => adam * lr / base,
            _ => lr,
        }
    }

    fn muon_step(&mut self, p: &Param<'_>, g: Tensor, shape: &[usize], lr: f64) -> Result<()> {
        let o = self.opts.clone();
        let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
        let [m] = slot.take_or_zeros(["momentum_buffer"], &g)?;
        slot.step += 1;
        // lerp: m + (g − m)(1 − β).
        let m = m.add(&g.sub(&m)?.mul_scalar(1.0 - o.momentum)?)?;
        slot.set("momentum_buffer", m.clone());
        let u = if o.nesterov {
            g.add(&m.sub(&g)?.mul_scalar(o.momentum)?)?
        } else {
            m
        };
        let flat = u.reshape(&[shape[0] as i64, -1])?;
        let x = self.orthogonalise(&flat)?;
        // The reference takes the ratio of the gradient's last two dimensions (a conv kernel's
        // height and width).
        let (r, c) = (shape[shape.len() - 2] as f64, shape[shape.len() - 1] as f64);
        let scale = (r / c).max(1.0).sqrt();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let w = p.tensor.detach()?.cast(DType::F32)?;
        let w = w.mul_scalar(1.0 - lr * o.weight_decay)?;
        write(
            p.tensor,
            &w.sub(&x.reshape(&dims)?.mul_scalar(lr * scale)?)?,
        )
    }

    fn adam_step(&mut self, p: &Param<'_>, g: Tensor, lr: f64) -> Result<()> {
        let lr = self.adam_rate(lr);
        let o = &self.opts;
        let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
        let [m, v] = slot.take_or_zeros(["exp_avg", "exp_avg_sq"], &g)?;
        slot.step += 1;
        let t = slot.step as i32;
        let m = m.add(&g.sub(&m)?.mul_scalar(1.0 - o.adam_beta1)?)?;
        let v = v.add(&g.powf(2.0)?.sub(&v)?.mul_scalar(1.0 - o.adam_beta2)?)?;
        let mc = m.div_scalar(1.0 - o.adam_beta1.powi(t))?;
        let vc = v.div_scalar(1.0 - o.adam_beta2.powi(t))?;
        let update = mc.div(&vc.sqrt()?.add_scalar(o.adam_eps)?)?;
        let w = p.tensor.detach()?.cast(DType::F32)?;
        let w = w.mul_scalar(1.0 - lr * o.adam_weight_decay)?;
        write(p.tensor, &w.sub(&update.mul_scalar(lr)?)?)?;
        slot.set("exp_avg", m);
        slot.set("exp_avg_sq", v);
        Ok(())
    }
}

impl Optimizer for Muon {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        for p in params {
            let Some(g) = p.grad else { continue };
            let g = g.detach()?.cast(DType::F32)?;
            let shape = p.tensor.shape()?;
            if self.takes_muon(p.name, &shape) {
                self.muon_step(p, g, &shape, lr)?;
            } else {
                self.adam_step(p, g, lr)?;
            }
        }
        Ok(())
    }

    /// `<parameter>.step` and `<parameter>.momentum_buffer` (Muon) or `.exp_avg`/`.exp_avg_sq`
    /// (Adam).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

pub struct MuonPlugin;

impl Plugin for MuonPlugin {
    const NAME: &'static str = "optim-muon";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = MuonOptions::default();
        vec![Descriptor::optimizer(
            "muon",
            Self::VERSION,
            "Muon: orthogonalised momentum for the hidden layers' matrices, Adam (at adam_lr) \
             for the rest (Keller Jordan's muon)",
            json!({
                "momentum": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.momentum},
                "nesterov": {"type": "boolean", "default": d.nesterov},
                "ns_steps": {"type": "integer", "minimum": 1, "default": d.ns_steps},
                "ns_bf16": {"type": "boolean", "default": d.ns_bf16,
                            "description": "Newton-Schulz in bfloat16, as the reference"},
                "weight_decay": {"type": "number", "minimum": 0, "default": d.weight_decay},
                "hidden_layers": {"type": "array", "items": {"type": "string"}, "default": d.hidden_layers,
                                  "description": "matrices whose name holds one of these take Muon, the rest Adam (empty: every matrix)"},
                "adam_lr": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": d.adam_lr,
                            "description": "the auxiliary Adam's learning rate (empty: the learning rate)"},
                "learning_rate": {"type": ["number", "null"], "description": "set by the host"},
                "adam_beta1": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.adam_beta1},
                "adam_beta2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.adam_beta2},
                "adam_eps": {"type": "number", "minimum": 0, "default": d.adam_eps},
                "adam_weight_decay": {"type": "number", "minimum": 0, "default": d.adam_weight_decay}
            }),
        )]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Optimizer, "muon") {
            bail!("this library has no {kind} `{id}`");
        }
        let opts: MuonOptions = parse_options(id, MuonOptions::default(), options)?;
        let betas = [opts.momentum, opts.adam_beta1, opts.adam_beta2];
        if betas.iter().any(|b| !(0.0..1.0).contains(b))
            || opts.ns_steps == 0
            || [opts.weight_decay, opts.adam_weight_decay, opts.adam_eps]
                .iter()
                .any(|v| *v < 0.0)
        {
            bail!(
                "invalid muon options {opts:?}: momentum and betas must be in [0, 1), ns_steps \
                 >= 1, decays and eps >= 0"
            );
        }
        Ok(Component::Optimizer(Box::new(Muon {
            opts,
            slots: Slots::new("muon", &["momentum_buffer", "exp_avg", "exp_avg_sq"]),
        })))
    }
}

export_plugin!(MuonPlugin);

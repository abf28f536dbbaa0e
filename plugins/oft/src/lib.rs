//! OFT as OneTrainer trains it (its OFT_2: peft's `OFTRotationModule`): the layer's input
//! features are split into blocks of `block_size`, each rotated by `R = cayley(Q)` with `Q` the
//! skew-symmetric matrix whose upper triangle is a row of `oft_R.weight` (`[blocks, b(b-1)/2]`,
//! one row for all blocks with `block_share`), the Cayley transform taken as peft's five-term
//! Neumann series `I + 2Q + 2Q² + 2Q³ + Q⁴`. A linear layer rotates its input, which is its
//! weight times `diag(R)ᵀ`; a conv layer has its weight (flattened to `[out, in·kh·kw]`)
//! times `diag(R)`, as OneTrainer does. `coft` projects each block's `Q` onto a Frobenius ball of
//! `coft_eps/√blocks` before every forward of a linear layer (constrained OFT; OneTrainer's conv
//! path skips the projection, and so does this one); `dropout` replaces whole blocks' rotations
//! by the identity while training (OneTrainer's multiplicative dropout). Initialised
//! at zero: a fresh adapter changes nothing. Files hold `<layer>.oft_R.weight` only, as
//! OneTrainer writes and ComfyUI's OFTv2 reads them.

use ferrite_plugin_api::{
    AdaptableLayer, Adapter, Component, ComponentKind, DType, Descriptor, Error, Plugin, Result,
    Tensor,
    adapter::{FileLayout, FileShapes, check_weight, forward_with_delta, load_into, merge_delta},
    bail, export_plugin, ops, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The layer this adapter sits on (name, weight shape, conv options).
    pub layer: Option<AdaptableLayer>,
    /// Features per rotated block; moved to the nearest divisor of the layer's input features.
    pub block_size: usize,
    /// Constrained OFT: keep each block's rotation within `coft_eps` of the identity.
    pub coft: bool,
    pub coft_eps: f64,
    /// One rotation shared by all blocks of a layer.
    pub block_share: bool,
    /// The probability of a block's rotation being left out (the identity) in a training step.
    pub dropout: f64,
    pub multiplier: f64,
    /// A file's tensors for this layer (set by the host when it loads one): the block size and
    /// sharing come from them.
    pub file_shapes: Option<FileShapes>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            layer: None,
            block_size: 32,
            coft: false,
            coft_eps: 1e-4,
            block_share: false,
            dropout: 0.0,
            multiplier: 1.0,
            file_shapes: None,
        }
    }
}

const WEIGHT: &str = "oft_R.weight";

/// OneTrainer's `adjust_oft_parameters`: the divisor of `features` nearest `wanted` (the
/// smaller on a tie), `features` itself when `wanted` is larger.
pub fn adjust_block_size(features: usize, wanted: usize) -> usize {
    if wanted >= features {
        return features;
    }
    let mut higher = wanted;
    while higher <= features && !features.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = wanted;
    while lower > 1 && !features.is_multiple_of(lower) {
        lower -= 1;
    }
    if wanted - lower <= higher - wanted {
        lower
    } else {
        higher
    }
}

/// The block size whose upper triangle has `n` elements, `b(b-1)/2 = n`.
fn block_of_elements(n: usize) -> Option<usize> {
    let b = ((1.0 + (1.0 + 8.0 * n as f64).sqrt()) / 2.0).round() as usize;
    (b >= 2 && b * (b - 1) / 2 == n).then_some(b)
}

pub struct Oft {
    o: Options,
    layer: AdaptableLayer,
    /// Features per block, and blocks per layer.
    block: usize,
    blocks: usize,
    /// `[blocks or 1, b(b-1)/2]`.
    weight: Tensor,
    /// For each of the `b·b` places of a block, 1 + the index of its upper-triangle element in
    /// a row of `weight`, 0 below the diagonal and on it (a zero column is put first).
    triu: Tensor,
    base: Option<Tensor>,
    training: bool,
    /// ΔW as merged, to take out again exactly.
    merged_delta: Option<Tensor>,
}

impl Oft {
    pub fn new(o: Options) -> Result<Self> {
        let layer = o
            .layer
            .clone()
            .ok_or_else(|| Error::msg("oft needs the `layer` option"))?;
        let ok = match layer.conv {
            None => layer.shape.len() == 2,
            Some(c) => layer.shape.len() == 4 && c.groups == 1 && c.dilation == [1, 1],
        };
        if !ok {
            bail!(
                "layer `{}`: oft supports linear and ungrouped, undilated conv layers, not shape \
                 {:?}",
                layer.name,
                layer.shape
            );
        }
        if o.block_size < 2 {
            bail!("options of `oft`: block_size must be at least 2");
        }
        if !(0.0..1.0).contains(&o.dropout) {
            bail!("options of `oft`: dropout (lora_dropout) must be in [0, 1)");
        }
        if o.coft_eps <= 0.0 {
            bail!("options of `oft`: coft_eps must be above 0");
        }
        let features: usize = layer.shape[1..].iter().product();
        let (block, rows) = match &o.file_shapes {
            Some(shapes) => Self::from_file(&layer, shapes, features)?,
            None => {
                let block = adjust_block_size(features, o.block_size);
                (block, if o.block_share { 1 } else { features / block })
            }
        };
        if block < 2 {
            bail!(
                "layer `{}`: no block size of at least 2 divides its {features} input features",
                layer.name
            );
        }
        let n = block * (block - 1) / 2;
        let weight = Tensor::zeros(&[rows, n], DType::F32)?;
        weight.set_requires_grad(true)?;
        let mut triu = vec![0i64; block * block];
        let mut k = 0;
        for i in 0..block {
            for j in i + 1..block {
                k += 1;
                triu[i * block + j] = k;
            }
        }
        Ok(Self {
            triu: Tensor::from_i64(&triu, &[block * block])?,
            o,
            layer,
            block,
            blocks: features / block,
            weight,
            base: None,
            training: false,
            merged_delta: None,
        })
    }

    /// Block size and rows of a file's `oft_R.weight`.
    fn from_file(
        layer: &AdaptableLayer,
        shapes: &FileShapes,
        features: usize,
    ) -> Result<(usize, usize)> {
        let fits = shapes.get(WEIGHT).and_then(|s| match s[..] {
            [rows, n] => {
                let b = block_of_elements(n)?;
                (features.is_multiple_of(b) && (rows == 1 || rows == features / b))
                    .then_some((b, rows))
            }
            _ => None,
        });
        fits.ok_or_else(|| {
            Error(format!(
                "layer `{}`: the file's OFT tensors {shapes:?} do not fit its {features} input \
                 features (oft_R.weight should be [blocks, b(b-1)/2] with b dividing them)",
                layer.name
            ))
        })
    }

    /// Constrained OFT (peft's `_project_batch`): each block's Q scaled back onto the ball of
    /// radius `coft_eps/√rows` where it lies outside. ‖Q‖_F = √2·‖row‖ for a skew Q.
    fn project(&self) -> Result<()> {
        let rows = self.weight.dim(0)?;
        let eps = self.o.coft_eps / (rows as f64).sqrt();
        let norm = self
            .weight
            .detach()?
            .powf(2.0)?
            .sum(&[1], true)?
            .mul_scalar(2.0)?
            .sqrt()?;
        let factor = norm
            .clamp(Some(f64::MIN_POSITIVE), None)?
            .powf(-1.0)?
            .mul_scalar(eps)?
            .clamp(None, Some(1.0))?;
        self.weight.assign(&self.weight.detach()?.mul(&factor)?)
    }

    /// `R − I` for every block, `[blocks, b, b]`.
    fn rotation_minus_identity(&self) -> Result<Tensor> {
        if self.o.coft && self.layer.conv.is_none() {
            self.project()?;
        }
        let (rows, b) = (self.weight.dim(0)?, self.block as i64);
        let zero = Tensor::zeros(&[rows, 1], self.weight.dtype()?)?;
        let upper = Tensor::cat(&[&zero, &self.weight], 1)?
            .index_select(1, &self.triu)?
            .reshape(&[rows as i64, b, b])?;
        let q = upper.sub(&upper.transpose(1, 2)?)?;
        let q2 = q.matmul(&q)?;
        let q3 = q2.matmul(&q)?;
        let q4 = q3.matmul(&q)?;
        let mut r = q.add(&q2)?.add(&q3)?.mul_scalar(2.0)?.add(&q4)?;
        // A dropped block's rotation is the identity: R − I is zero there.
        if self.training && self.o.dropout > 0.0 && rows > 1 {
            let keep = ops::dropout(&Tensor::ones(&[rows, 1, 1], DType::F32)?, self.o.dropout)?
                .gt_scalar(0.0)?
                .cast(DType::F32)?;
            r = r.mul(&keep)?;
        }
        if rows != self.blocks {
            r = r.expand(&[self.blocks, self.block, self.block])?;
        }
        Ok(r)
    }

    /// ΔW: the bound weight times `diag(R)ᵀ − I` (linear: the rotated input) or `diag(R) − I`
    /// (conv), in the weight's shape.
    fn delta(&self) -> Result<Tensor> {
        let w = self
            .base
            .as_ref()
            .ok_or_else(|| Error(format!("layer `{}`: adapter not bound", self.layer.name)))?;
        let mut r = self.rotation_minus_identity()?;
        if self.layer.conv.is_none() {
            r = r.transpose(1, 2)?;
        }
        let (out, blocks, b) = (
            self.layer.out_features() as i64,
            self.blocks as i64,
            self.block as i64,
        );
        let shape: Vec<i64> = self.layer.shape.iter().map(|&s| s as i64).collect();
        w.cast(self.weight.dtype()?)?
            .reshape(&[out, blocks, b])?
            .permute(&[1, 0, 2])?
            .matmul(&r)?
            .permute(&[1, 0, 2])?
            .reshape(&shape)
    }
}

impl Adapter for Oft {
    fn bind(&mut self, weight: Tensor, _bias: Option<Tensor>) -> Result<()> {
        check_weight(&self.layer, &weight)?;
        self.base = Some(weight);
        Ok(())
    }

    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(WEIGHT.into(), self.weight.clone())])
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.parameters()
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let name = self.layer.name.clone();
        let mut seen = false;
        for (k, t) in &state {
            match k.as_str() {
                WEIGHT => {
                    load_into(&name, k, &self.weight, t)?;
                    seen = true;
                }
                // The host gives every adapter an alpha; OFT has none.
                "alpha" => {}
                _ => bail!("layer `{name}`: `{k}` is not an OFT tensor (only {WEIGHT})"),
            }
        }
        if !seen {
            bail!("layer `{name}`: the OFT state needs {WEIGHT}");
        }
        Ok(())
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        forward_with_delta(&self.layer, x, base_out, &self.delta()?, self.o.multiplier)
    }

    fn merged_weight(&mut self) -> Result<Tensor> {
        let delta = self.delta()?.detach()?;
        let merged = merge_delta(&self.layer, self.base.as_ref(), &delta, self.o.multiplier)?;
        self.merged_delta = Some(delta);
        Ok(merged)
    }

    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        // The bound weight is the merged one now: ΔW is the one that went in.
        let delta = match &self.merged_delta {
            Some(d) => d.clone(),
            None => self.delta()?,
        };
        merged.sub(&delta.mul_scalar(self.o.multiplier)?)
    }
}

fn file_layout() -> FileLayout {
    FileLayout {
        tensors: vec![WEIGHT.into()],
        markers: vec![WEIGHT.into()],
        rank_from: vec![WEIGHT.into()],
        network_module: "ferrite.oft".into(),
        network_args: [("algo".to_string(), "oft_2".to_string())].into(),
        name: "OFT".into(),
        ..FileLayout::default()
    }
}

pub struct OftPlugin;

impl Plugin for OftPlugin {
    const NAME: &'static str = "oft";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = Options::default();
        vec![Descriptor {
            kind: ComponentKind::Adapter,
            id: "oft".into(),
            version: Self::VERSION.into(),
            description: "OFT (orthogonal fine-tuning, OneTrainer's OFT_2)".into(),
            options_schema: ferrite_plugin_api::adapter::with_file_layout(
                json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "block_size": {"type": "integer", "minimum": 2, "default": d.block_size,
                                       "description": "features per rotated block (moved to the nearest divisor of each layer's)"},
                        "coft": {"type": "boolean", "default": d.coft,
                                 "description": "constrained OFT"},
                        "coft_eps": {"type": "number", "exclusiveMinimum": 0, "default": d.coft_eps},
                        "block_share": {"type": "boolean", "default": d.block_share},
                        "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.dropout},
                        "multiplier": {"type": "number", "default": d.multiplier},
                        "layer": {"type": "object", "description": "set by the host"},
                        "file_shapes": {"type": ["object", "null"], "description": "set by the host"}
                    }
                }),
                &file_layout(),
            ),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Adapter, "oft") {
            bail!("this library has no {kind} `{id}`");
        }
        let o: Options = parse_options(id, Options::default(), options)?;
        Ok(Component::Adapter(Box::new(Oft::new(o)?)))
    }
}

export_plugin!(OftPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    /// OneTrainer's adjust_oft_parameters on the sizes SD's layers have.
    #[test]
    fn block_size_moves_to_the_nearest_divisor() {
        for (features, wanted, want) in [
            (320, 32, 32),
            (768, 32, 32),
            (2880, 32, 32),
            (1280, 48, 40),
            (100, 32, 25),
            (90, 32, 30),
            (16, 32, 16),
            (12, 5, 4),
            (7, 4, 1),
        ] {
            assert_eq!(
                adjust_block_size(features, wanted),
                want,
                "{features}, {wanted}"
            );
        }
        assert_eq!(block_of_elements(496), Some(32));
        assert_eq!(block_of_elements(28), Some(8));
        assert_eq!(block_of_elements(27), None);
    }
}

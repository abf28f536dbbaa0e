//! Adapters of layers that a file layout fuses into one module (Flux's `img_attn.qkv` holds
//! `to_q`, `to_k`, `to_v`). Writing stacks the members' adapters exactly, as sd-scripts does:
//! the `[rank, in]` factors by rows, the `[out, rank]` factors block-diagonally, alpha times the
//! member count (so alpha / rank stays). Reading splits a fused adapter: a block-diagonal one
//! back into the members' own (as diffusers does), any other by giving every member the shared
//! `[rank, in]` factors and its rows of the `[out, rank]` ones — exact either way.

use ferrite_plugin_api::{AdaptableLayer, Tensor, adapter::scalar};

use super::{AdapterError, Result, err};

/// Kohya suffixes of `[rank, in]` factors (LoRA's down, LoHa's `b`s) and of `[out, rank]`
/// factors (LoRA's up, LoHa's `a`s).
const SHARED: [&str; 3] = ["lora_down.weight", "hada_w1_b", "hada_w2_b"];
const BY_ROWS: [&str; 3] = ["lora_up.weight", "hada_w1_a", "hada_w2_a"];

/// The fused rows of a member: (start, its rows, the module's rows).
fn rows(layer: &AdaptableLayer) -> Result<(usize, usize, usize)> {
    let f = layer.fused.ok_or_else(|| {
        AdapterError(format!(
            "layer `{}` shares its file key with others but is not fused",
            layer.name
        ))
    })?;
    Ok((f.start, layer.out_features(), f.rows))
}

fn find<'a>(state: &'a [(String, Tensor)], suffix: &str) -> Option<&'a Tensor> {
    state.iter().find(|(k, _)| k == suffix).map(|(_, t)| t)
}

fn rank_of(name: &str, state: &[(String, Tensor)]) -> Result<usize> {
    SHARED
        .iter()
        .find_map(|s| find(state, s))
        .ok_or_else(|| AdapterError(format!("layer `{name}`: no down-projection in its state")))?
        .shape()
        .map_err(err)
        .map(|s| s[0])
}

fn alpha_of(name: &str, state: &[(String, Tensor)]) -> Result<f64> {
    let t = find(state, "alpha")
        .ok_or_else(|| AdapterError(format!("layer `{name}`: no alpha in its state")))?;
    scalar(name, "alpha", t).map_err(err)
}

fn zeros(rows: usize, cols: usize, like: &Tensor) -> Result<Tensor> {
    Tensor::zeros(&[rows, cols], like.dtype().map_err(err)?).map_err(err)
}

/// A fused module's member: its layer and its adapter's state (kohya suffixes).
pub type Member<'a> = (&'a AdaptableLayer, &'a [(String, Tensor)]);

/// One fused state (kohya suffixes) from the adapters of some or all of a module's members; rows
/// of members without an adapter are zero.
pub fn fuse(key: &str, members: &[Member]) -> Result<Vec<(String, Tensor)>> {
    let mut members = members.to_vec();
    members.sort_by_key(|(l, _)| l.fused.map(|f| f.start));
    let (first, first_state) = members[0];
    let (rank, alpha) = (
        rank_of(&first.name, first_state)?,
        alpha_of(&first.name, first_state)?,
    );
    for (l, s) in &members {
        if rank_of(&l.name, s)? != rank || alpha_of(&l.name, s)? != alpha {
            return Err(AdapterError(format!(
                "{key}: the layers fused there have adapters of different rank or alpha, which \
                 this layout cannot hold: save as diffusers"
            )));
        }
    }
    let n = members.len();
    let (_, _, total) = rows(first)?;
    let mut out = Vec::new();
    for (suffix, t) in first_state {
        let parts = members
            .iter()
            .map(|(l, s)| {
                find(s, suffix)
                    .ok_or_else(|| AdapterError(format!("layer `{}`: no {suffix}", l.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let fused = match suffix.as_str() {
            "alpha" => Tensor::from_f32(&[(alpha * n as f64) as f32], &[]).map_err(err)?,
            s if SHARED.contains(&s) => Tensor::cat(&parts, 0).map_err(err)?,
            s if BY_ROWS.contains(&s) || s == "dora_scale" => {
                // Row blocks in module order; a gap (a member without an adapter) is zero.
                let cols = if s == "dora_scale" { 1 } else { n * rank };
                let mut blocks = Vec::new();
                let mut next = 0;
                for (j, ((l, _), part)) in members.iter().zip(&parts).enumerate() {
                    let (start, len, _) = rows(l)?;
                    if start > next {
                        if s == "dora_scale" {
                            return Err(AdapterError(format!(
                                "{key}: DoRA on only some of the layers fused there cannot be \
                                 saved in this layout: save as diffusers"
                            )));
                        }
                        blocks.push(zeros(start - next, cols, t)?);
                    }
                    let block = if s == "dora_scale" {
                        (*part).clone()
                    } else {
                        let mut row = Vec::new();
                        if j > 0 {
                            row.push(zeros(len, j * rank, t)?);
                        }
                        row.push((*part).clone());
                        if j + 1 < n {
                            row.push(zeros(len, (n - j - 1) * rank, t)?);
                        }
                        Tensor::cat(&row.iter().collect::<Vec<_>>(), 1).map_err(err)?
                    };
                    blocks.push(block);
                    next = start + len;
                }
                if next < total {
                    if s == "dora_scale" {
                        return Err(AdapterError(format!(
                            "{key}: DoRA on only some of the layers fused there cannot be saved \
                             in this layout: save as diffusers"
                        )));
                    }
                    blocks.push(zeros(total - next, cols, t)?);
                }
                Tensor::cat(&blocks.iter().collect::<Vec<_>>(), 0).map_err(err)?
            }
            other => {
                return Err(AdapterError(format!(
                    "{key}: `{other}` cannot be fused into one module"
                )));
            }
        };
        out.push((suffix.clone(), fused));
    }
    Ok(out)
}

/// Whether every `[out, rank]` factor is block-diagonal over the members: member `j`'s rows are
/// zero outside columns `j·rank/n ..`.
fn block_diagonal(
    members: &[&AdaptableLayer],
    state: &[(String, Tensor)],
    rank: usize,
) -> Result<bool> {
    let n = members.len();
    if n < 2 || !rank.is_multiple_of(n) {
        return Ok(false);
    }
    let r = rank / n;
    for (_, t) in state.iter().filter(|(k, _)| BY_ROWS.contains(&k.as_str())) {
        for (j, l) in members.iter().enumerate() {
            let (start, len, _) = rows(l)?;
            let block = t.narrow(0, start, len).map_err(err)?;
            for (from, width) in [(0, j * r), ((j + 1) * r, rank - (j + 1) * r)] {
                if width == 0 {
                    continue;
                }
                let off = block.narrow(1, from, width).map_err(err)?;
                let largest = off.abs().map_err(err)?.to_vec().map_err(err)?;
                if largest.iter().any(|v| *v != 0.0) {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// A member's share of a fused adapter: its rank, alpha and state.
pub struct Share {
    pub layer: AdaptableLayer,
    pub rank: usize,
    pub alpha: f64,
    pub state: Vec<(String, Tensor)>,
}

/// Splits a fused adapter (`state` under kohya suffixes, its alpha included) into its members'.
pub fn split(
    key: &str,
    members: &[&AdaptableLayer],
    state: &[(String, Tensor)],
    rank: usize,
    alpha: f64,
) -> Result<Vec<Share>> {
    let mut members = members.to_vec();
    members.sort_by_key(|l| l.fused.map(|f| f.start));
    let (_, _, total) = rows(members[0])?;
    for (suffix, t) in state {
        if (BY_ROWS.contains(&suffix.as_str()) || suffix == "dora_scale")
            && t.shape().map_err(err)?.first() != Some(&total)
        {
            return Err(AdapterError(format!(
                "{key}: its {suffix} does not have the {total} rows of the fused module"
            )));
        }
    }
    let n = members.len();
    let diagonal = block_diagonal(&members, state, rank)?;
    let r = if diagonal { rank / n } else { rank };
    members
        .iter()
        .enumerate()
        .map(|(j, l)| {
            let (start, len, _) = rows(l)?;
            let mut own = Vec::new();
            for (suffix, t) in state {
                let s = suffix.as_str();
                let part = match s {
                    "alpha" => continue,
                    _ if SHARED.contains(&s) && diagonal => t.narrow(0, j * r, r),
                    _ if SHARED.contains(&s) => Ok(t.clone()),
                    _ if BY_ROWS.contains(&s) && diagonal => {
                        t.narrow(0, start, len).and_then(|b| b.narrow(1, j * r, r))
                    }
                    _ => t.narrow(0, start, len),
                }
                .map_err(err)?;
                own.push((suffix.clone(), part));
            }
            // A block-diagonal file's alpha covers all members' ranks together.
            let alpha = if diagonal { alpha / n as f64 } else { alpha };
            own.push((
                "alpha".into(),
                Tensor::from_f32(&[alpha as f32], &[]).map_err(err)?,
            ));
            Ok(Share {
                layer: (*l).clone(),
                rank: r,
                alpha,
                state: own,
            })
        })
        .collect()
}

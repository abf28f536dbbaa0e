//! Adapters of layers that a file layout fuses into one module (Flux's `img_attn.qkv` holds
//! `to_q`, `to_k`, `to_v`). Writing stacks the members' adapters exactly, as sd-scripts does:
//! the `[rank, in]` factors by rows, the `[out, rank]` factors block-diagonally, alpha times the
//! member count (so alpha / rank stays). Reading splits a fused adapter: a block-diagonal one
//! back into the members' own (as diffusers does), any other by giving every member the shared
//! `[rank, in]` factors and its rows of the `[out, rank]` ones — exact either way. A member
//! without an adapter is written as zero factors and read back as absent.

use ferrite_plugin_api::{
    AdaptableLayer, Tensor,
    adapter::{FileLayout, scalar},
};

use super::{AdapterError, Result, err};

/// Whether `suffix` is one of `list` (the layout's `[rank, in]` factors, `[out, rank]` factors
/// or per-output tensors: LoRA's down, up and DoRA scale, LoHa's `b`s and `a`s).
fn among(list: &[String], suffix: &str) -> bool {
    list.iter().any(|s| s == suffix)
}

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

fn rank_of(layout: &FileLayout, name: &str, state: &[(String, Tensor)]) -> Result<usize> {
    super::formats::rank_of(layout, state)
        .ok_or_else(|| AdapterError(format!("layer `{name}`: no rank tensor in its state")))
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

fn partial_gap(key: &str, suffix: &str) -> AdapterError {
    AdapterError(format!(
        "{key}: `{suffix}` (DoRA's scale, say) on only some of the layers fused there cannot be \
         saved in this layout: save as diffusers, or adapt all of them"
    ))
}

/// One fused state (kohya suffixes) from the adapters of a module's members (`layers`: all of
/// them, `adapted`: those with an adapter). A member without one gets zero factors of the same
/// rank, so the module is always block-diagonal over all its members and reads back as they
/// were.
pub fn fuse(
    key: &str,
    layout: &FileLayout,
    layers: &[&AdaptableLayer],
    adapted: &[Member],
) -> Result<Vec<(String, Tensor)>> {
    let mut layers = layers.to_vec();
    layers.sort_by_key(|l| l.fused.map(|f| f.start));
    let state_of = |l: &AdaptableLayer| {
        adapted
            .iter()
            .find(|(a, _)| a.name == l.name)
            .map(|(_, s)| *s)
    };
    let (first, first_state) = adapted
        .first()
        .copied()
        .ok_or_else(|| AdapterError(format!("{key}: no adapter to save")))?;
    let (rank, alpha) = (
        rank_of(layout, &first.name, first_state)?,
        alpha_of(&first.name, first_state)?,
    );
    for (l, s) in adapted {
        if rank_of(layout, &l.name, s)? != rank || alpha_of(&l.name, s)? != alpha {
            return Err(AdapterError(format!(
                "{key}: the layers fused there have adapters of different rank or alpha, which \
                 this layout cannot hold: save as diffusers"
            )));
        }
    }
    let n = layers.len();
    let mut out = Vec::new();
    for (suffix, t) in first_state {
        let s = suffix.as_str();
        let part = |l: &AdaptableLayer| -> Result<Tensor> {
            if let Some(state) = state_of(l) {
                return find(state, s)
                    .cloned()
                    .ok_or_else(|| AdapterError(format!("layer `{}`: no {s}", l.name)));
            }
            match s {
                "alpha" => Ok(t.clone()),
                _ if among(&layout.rank_rows, s) => {
                    zeros(rank, l.shape.get(1).copied().unwrap_or(0), t)
                }
                _ if among(&layout.out_rows, s) => zeros(l.out_features(), rank, t),
                _ => Err(partial_gap(key, s)),
            }
        };
        let parts = layers.iter().map(|l| part(l)).collect::<Result<Vec<_>>>()?;
        let fused = match s {
            "alpha" => Tensor::from_f32(&[(alpha * n as f64) as f32], &[]).map_err(err)?,
            _ if among(&layout.rank_rows, s) || among(&layout.per_output, s) => {
                Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0).map_err(err)?
            }
            _ if among(&layout.out_rows, s) => {
                // Member j's rows hold its factor in columns j·rank.., zeros elsewhere.
                let mut blocks = Vec::new();
                for (j, (l, p)) in layers.iter().zip(&parts).enumerate() {
                    let len = l.out_features();
                    let mut row = Vec::new();
                    if j > 0 {
                        row.push(zeros(len, j * rank, t)?);
                    }
                    row.push(p.clone());
                    if j + 1 < n {
                        row.push(zeros(len, (n - j - 1) * rank, t)?);
                    }
                    blocks.push(Tensor::cat(&row.iter().collect::<Vec<_>>(), 1).map_err(err)?);
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

/// Whether a `[rows, cols]` tensor is all zero (read back to the host: files load once).
fn all_zero(t: &Tensor) -> Result<bool> {
    Ok(t.to_vec().map_err(err)?.iter().all(|v| *v == 0.0))
}

/// Whether every `[out, rank]` factor is block-diagonal over the members: member `j`'s rows are
/// zero outside columns `j·rank/n ..`.
fn block_diagonal(
    layout: &FileLayout,
    members: &[&AdaptableLayer],
    state: &[(String, Tensor)],
    rank: usize,
) -> Result<bool> {
    let n = members.len();
    if n < 2 || !rank.is_multiple_of(n) {
        return Ok(false);
    }
    let r = rank / n;
    for (_, t) in state.iter().filter(|(k, _)| among(&layout.out_rows, k)) {
        for (j, l) in members.iter().enumerate() {
            let (start, len, _) = rows(l)?;
            let block = t.narrow(0, start, len).map_err(err)?;
            for (from, width) in [(0, j * r), ((j + 1) * r, rank - (j + 1) * r)] {
                if width == 0 {
                    continue;
                }
                if !all_zero(&block.narrow(1, from, width).map_err(err)?)? {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// A member's share of a fused adapter: its alpha and state.
pub struct Share {
    pub layer: AdaptableLayer,
    pub alpha: f64,
    pub state: Vec<(String, Tensor)>,
}

/// Splits a fused adapter (`state` under kohya suffixes, its alpha included) into its members'.
pub fn split(
    key: &str,
    layout: &FileLayout,
    members: &[&AdaptableLayer],
    state: &[(String, Tensor)],
    rank: usize,
    alpha: f64,
) -> Result<Vec<Share>> {
    let mut members = members.to_vec();
    members.sort_by_key(|l| l.fused.map(|f| f.start));
    let (_, _, total) = rows(
        members
            .first()
            .ok_or_else(|| AdapterError(format!("{key}: no layer to split it into")))?,
    )?;
    for (suffix, t) in state {
        let known = [&layout.rank_rows, &layout.out_rows, &layout.per_output];
        if suffix != "alpha" && !known.iter().any(|l| among(l, suffix)) {
            return Err(AdapterError(format!(
                "{key}: `{suffix}` cannot be split between the layers fused there"
            )));
        }
        if (among(&layout.out_rows, suffix) || among(&layout.per_output, suffix))
            && t.shape().map_err(err)?.first() != Some(&total)
        {
            return Err(AdapterError(format!(
                "{key}: its {suffix} does not have the {total} rows of the fused module"
            )));
        }
    }
    let n = members.len();
    let diagonal = block_diagonal(layout, &members, state, rank)?;
    let r = if diagonal { rank / n } else { rank };
    let shares = members
        .iter()
        .enumerate()
        .map(|(j, l)| {
            let (start, len, _) = rows(l)?;
            let mut own = Vec::new();
            for (suffix, t) in state {
                let s = suffix.as_str();
                let part = match s {
                    "alpha" => continue,
                    _ if among(&layout.rank_rows, s) && diagonal => t.narrow(0, j * r, r),
                    _ if among(&layout.rank_rows, s) => Ok(t.clone()),
                    _ if among(&layout.out_rows, s) && diagonal => {
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
                alpha,
                state: own,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // A member whose up-projections are zero was not adapted (`fuse` fills it so): left out,
    // unless none is adapted yet (a file saved before any step).
    let mut idle = Vec::new();
    for share in &shares {
        let mut zero = true;
        for (_, t) in share
            .state
            .iter()
            .filter(|(k, _)| among(&layout.out_rows, k))
        {
            zero &= all_zero(t)?;
        }
        idle.push(zero);
    }
    if idle.iter().all(|z| *z) {
        return Ok(shares);
    }
    Ok(shares
        .into_iter()
        .zip(idle)
        .filter_map(|(s, zero)| (!zero).then_some(s))
        .collect())
}

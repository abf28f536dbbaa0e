//! The op table: every op's code, name, tensor inputs and attributes, written once. The plugin
//! side encodes an [`Op`] and the host decodes the same [`Op`], so no attribute slot can mean one
//! thing to a plugin and another to the host. Codes are never reused or renumbered; new ops and
//! new attribute structs are appended (a minor ABI bump).

use abi_stable::std_types::RVec;

use crate::abi::{Attr, Attr_NE, DType, OpCode, known_ref};

/// One attribute's Rust type and its ABI form.
pub trait AttrValue: Sized {
    /// What the attribute should be, for errors.
    const WANT: &'static str;
    fn to_attr(&self) -> Attr;
    /// None when `a` is not of this type. `None` stands for an absent attribute.
    fn from_attr(a: Option<&Attr>) -> Option<Self>;
}

macro_rules! attr_value {
    ($t:ty, $want:literal, |$s:ident| $to:expr, $pat:pat => $from:expr) => {
        impl AttrValue for $t {
            const WANT: &'static str = $want;
            fn to_attr(&self) -> Attr {
                let $s = self;
                $to
            }
            fn from_attr(a: Option<&Attr>) -> Option<Self> {
                match a {
                    $pat => Some($from),
                    _ => None,
                }
            }
        }
    };
}

attr_value!(i64, "an integer", |v| Attr::Int(*v), Some(Attr::Int(v)) => *v);
attr_value!(f64, "a number", |v| Attr::Float(*v), Some(Attr::Float(v)) => *v);
attr_value!(bool, "a bool", |v| Attr::Bool(*v), Some(Attr::Bool(v)) => *v);
attr_value!(String, "a string", |v| Attr::Str(v.as_str().into()), Some(Attr::Str(v)) => v.to_string());
attr_value!(Vec<i64>, "a list of integers", |v| Attr::Ints(v.as_slice().into()), Some(Attr::Ints(v)) => v.to_vec());
attr_value!(Vec<f32>, "a list of floats", |v| Attr::Floats(v.as_slice().into()), Some(Attr::Floats(v)) => v.to_vec());

impl AttrValue for usize {
    const WANT: &'static str = "a non-negative integer";
    fn to_attr(&self) -> Attr {
        Attr::Int(*self as i64)
    }
    fn from_attr(a: Option<&Attr>) -> Option<Self> {
        usize::try_from(i64::from_attr(a)?).ok()
    }
}

impl AttrValue for u64 {
    const WANT: &'static str = "a non-negative integer";
    fn to_attr(&self) -> Attr {
        Attr::Int(*self as i64)
    }
    fn from_attr(a: Option<&Attr>) -> Option<Self> {
        Some(i64::from_attr(a)? as u64)
    }
}

impl AttrValue for Vec<usize> {
    const WANT: &'static str = "a list of non-negative integers";
    fn to_attr(&self) -> Attr {
        Attr::Ints(self.iter().map(|&v| v as i64).collect())
    }
    fn from_attr(a: Option<&Attr>) -> Option<Self> {
        Vec::<i64>::from_attr(a)?
            .into_iter()
            .map(|v| usize::try_from(v).ok())
            .collect()
    }
}

impl AttrValue for [usize; 2] {
    const WANT: &'static str = "two non-negative integers";
    fn to_attr(&self) -> Attr {
        self.to_vec().to_attr()
    }
    fn from_attr(a: Option<&Attr>) -> Option<Self> {
        Vec::<usize>::from_attr(a)?.try_into().ok()
    }
}

impl AttrValue for DType {
    const WANT: &'static str = "a dtype";
    fn to_attr(&self) -> Attr {
        Attr::DType(self.to_ne())
    }
    fn from_attr(a: Option<&Attr>) -> Option<Self> {
        match a {
            Some(Attr::DType(d)) => d.as_enum().ok().copied(),
            _ => None,
        }
    }
}

impl<T: AttrValue> AttrValue for Option<T> {
    const WANT: &'static str = T::WANT;
    fn to_attr(&self) -> Attr {
        self.as_ref().map_or(Attr::None, T::to_attr)
    }
    fn from_attr(a: Option<&Attr>) -> Option<Self> {
        match a {
            None | Some(Attr::None) => Some(None),
            a => T::from_attr(a).map(Some),
        }
    }
}

/// Closed sets of names that cross as strings.
macro_rules! attr_names {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $variant),* }

        impl AttrValue for $name {
            const WANT: &'static str = concat!("one of" $(, " ", $text)*);
            fn to_attr(&self) -> Attr {
                Attr::Str(match self { $(Self::$variant => $text),* }.into())
            }
            fn from_attr(a: Option<&Attr>) -> Option<Self> {
                match a {
                    $(Some(Attr::Str(s)) if s.as_str() == $text => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

attr_names!(
    /// How `gelu` is computed.
    GeluApproximation { None = "none", Tanh = "tanh" }
);

attr_names!(
    InterpolateMode {
        /// torch's `nearest` (floor of the scaled index).
        Nearest = "nearest",
        /// torch's `bilinear` with `align_corners=False`.
        Bilinear = "bilinear",
    }
);

/// Attributes of one kind of op, in ABI order.
pub trait OpArgs: Sized {
    fn encode(&self, out: &mut Vec<Attr>);
    fn decode(op: &str, attrs: &[&Attr]) -> Result<Self, String>;
}

fn attr<T: AttrValue>(op: &str, field: &str, i: usize, attrs: &[&Attr]) -> Result<T, String> {
    let a = attrs.get(i).copied();
    T::from_attr(a).ok_or_else(|| match a {
        None => format!("op {op}: attribute `{field}` is missing"),
        Some(got) => format!(
            "op {op}: attribute `{field}` should be {}, got {got:?}",
            T::WANT
        ),
    })
}

macro_rules! op_args {
    ($($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $t:ty),* $(,)? })*) => {
        $(
            $(#[$m])*
            #[derive(Debug, Clone, PartialEq)]
            pub struct $name { $($(#[$fm])* pub $field: $t),* }

            impl OpArgs for $name {
                fn encode(&self, _out: &mut Vec<Attr>) {
                    $(_out.push(self.$field.to_attr());)*
                }
                #[allow(unused_mut, unused_variables)]
                fn decode(op: &str, attrs: &[&Attr]) -> Result<Self, String> {
                    let mut i = 0;
                    let v = $name { $($field: { i += 1; attr(op, stringify!($field), i - 1, attrs)? }),* };
                    if attrs.len() > i {
                        return Err(format!(
                            "op {op}: {} attributes given, this host knows {i} (a plugin built against a newer plugin-api?)",
                            attrs.len()
                        ));
                    }
                    Ok(v)
                }
            }
        )*
    };
}

op_args! {
    /// No attributes.
    NoArgs {}
    /// Zeros or ones.
    Shaped { shape: Vec<usize>, dtype: DType }
    /// A constant tensor.
    Fill { shape: Vec<usize>, value: f64, dtype: DType }
    Arange { start: i64, end: i64, step: usize, dtype: DType }
    /// Random draws from a host generator.
    Random { shape: Vec<usize>, rng: u64 }
    FromF32 { data: Vec<f32>, shape: Vec<usize> }
    FromI64 { data: Vec<i64>, shape: Vec<usize> }
    /// `-1` in one place infers that dimension.
    Reshape { shape: Vec<i64> }
    Dims { dims: Vec<usize> }
    Shape { shape: Vec<usize> }
    Transpose { dim0: usize, dim1: usize }
    Narrow { dim: usize, start: usize, len: usize }
    Dim { dim: usize }
    Chunk { chunks: usize, dim: usize }
    /// Pads the last dimensions, `[last_before, last_after, ...]`.
    Pad { pads: Vec<usize>, value: f64 }
    /// With one tensor input, the other operand is `scalar`.
    Binary { scalar: Option<f64> }
    Gelu { approximation: GeluApproximation }
    Clamp { min: Option<f64>, max: Option<f64> }
    /// Over `dims` (all when empty).
    Reduce { dims: Vec<usize>, keepdim: bool }
    Var { dims: Vec<usize>, keepdim: bool, correction: usize }
    Conv { stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2], groups: usize }
    ConvTranspose {
        stride: [usize; 2],
        padding: [usize; 2],
        output_padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    }
    GroupNorm { groups: usize, eps: f64 }
    Norm { eps: f64 }
    /// `None`: `1/sqrt(D)`.
    Attention { scale: Option<f64> }
    Interpolate { size: [usize; 2], mode: InterpolateMode }
    Dropout { p: f64 }
    Cast { dtype: DType }
    ToDevice { device: String }
    /// A model part's id (`unet`, `text_encoder`).
    Part { part: String }
    /// 1.7, the multi-tensor (foreach) ops: `a·x + b·y` (axpby) or `a·x + b·y·z` (addcmul) for
    /// each tensor of the lists.
    Axpby { a: f64, b: f64 }
    /// `a·x + b·y / (c·√z + eps)` for each tensor of the lists.
    AddcdivSqrt { a: f64, b: f64, c: f64, eps: f64 }
    RequiresGrad { requires: bool }
}

/// How many tensor inputs an op takes: `required` ones, then `optional` ones (passed as
/// [`TensorId::NONE`](crate::TensorId::NONE) when absent), or with `variadic` any number ≥
/// `required`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    pub required: usize,
    pub optional: usize,
    pub variadic: bool,
}

impl Inputs {
    pub fn check(self, op: &str, n: usize) -> Result<(), String> {
        let ok = if self.variadic {
            n >= self.required
        } else {
            n == self.required + self.optional
        };
        if ok {
            return Ok(());
        }
        let want = match (self.variadic, self.optional) {
            (true, _) => format!("at least {}", self.required),
            (false, 0) => self.required.to_string(),
            (false, o) => format!("{} (the last {o} optional)", self.required + o),
        };
        Err(format!("op {op}: expected {want} tensor inputs, got {n}"))
    }
}

macro_rules! op_table {
    ($($code:literal $konst:ident $variant:ident $name:literal ($req:literal, $opt:literal, $var:literal) $args:ident;)*) => {
        impl OpCode {
            $(pub const $konst: OpCode = OpCode($code);)*


            pub fn name(self) -> &'static str {
                match self.0 {
                    $($code => $name,)*
                    _ => "unknown",
                }
            }

            /// The op's tensor inputs; None for an op this side does not know.
            pub fn inputs(self) -> Option<Inputs> {
                match self.0 {
                    $($code => Some(Inputs { required: $req, optional: $opt, variadic: $var }),)*
                    _ => None,
                }
            }
        }

        /// An op with its attributes, as both sides see it. Exhaustive on purpose (it never
        /// crosses the ABI as such): a new op does not compile in the host until it is run there.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Op {
            $($variant($args),)*
        }

        impl Op {
            pub fn code(&self) -> OpCode {
                match self {
                    $(Op::$variant(_) => OpCode($code),)*
                }
            }

            pub fn encode(&self) -> RVec<Attr_NE> {
                let mut out = Vec::new();
                match self {
                    $(Op::$variant(a) => a.encode(&mut out),)*
                }
                out.into_iter().map(Attr_NE::new).collect()
            }

            /// The op `code` with its attributes checked against the table (and its number of
            /// inputs, `n_inputs`); errors name the op and the attribute.
            pub fn decode(code: OpCode, n_inputs: usize, attrs: &[Attr_NE]) -> Result<Op, String> {
                let Some(inputs) = code.inputs() else {
                    return Err(format!(
                        "op code {} is not known to this host (a plugin built against a newer plugin-api?)",
                        code.0
                    ));
                };
                inputs.check(code.name(), n_inputs)?;
                // Borrowed, not copied: attributes can hold uploads (`from_f32`).
                let attrs = attrs
                    .iter()
                    .map(|a| known_ref("op attribute", a))
                    .collect::<Result<Vec<&Attr>, String>>()?;
                Ok(match code.0 {
                    $($code => Op::$variant($args::decode($name, &attrs)?),)*
                    _ => unreachable!("inputs() knows exactly the codes matched here"),
                })
            }
        }
    };
}

op_table! {
    1 ZEROS Zeros "zeros" (0, 0, false) Shaped;
    2 ONES Ones "ones" (0, 0, false) Shaped;
    3 FULL Full "full" (0, 0, false) Fill;
    4 ARANGE Arange "arange" (0, 0, false) Arange;
    5 RANDN Randn "randn" (0, 0, false) Random;
    6 RAND Rand "rand" (0, 0, false) Random;
    7 FROM_F32 FromF32 "from_f32" (0, 0, false) FromF32;
    8 FROM_I64 FromI64 "from_i64" (0, 0, false) FromI64;
    9 RESHAPE Reshape "reshape" (1, 0, false) Reshape;
    10 PERMUTE Permute "permute" (1, 0, false) Dims;
    11 TRANSPOSE Transpose "transpose" (1, 0, false) Transpose;
    12 NARROW Narrow "narrow" (1, 0, false) Narrow;
    13 CAT Cat "cat" (1, 0, true) Dim;
    14 STACK Stack "stack" (1, 0, true) Dim;
    15 CHUNK Chunk "chunk" (1, 0, false) Chunk;
    16 EXPAND Expand "expand" (1, 0, false) Shape;
    17 INDEX_SELECT IndexSelect "index_select" (2, 0, false) Dim;
    18 GATHER Gather "gather" (2, 0, false) Dim;
    19 PAD Pad "pad" (1, 0, false) Pad;
    20 ADD Add "add" (1, 1, false) Binary;
    21 SUB Sub "sub" (1, 1, false) Binary;
    22 MUL Mul "mul" (1, 1, false) Binary;
    23 DIV Div "div" (1, 1, false) Binary;
    24 POW Pow "pow" (1, 1, false) Binary;
    25 NEG Neg "neg" (1, 0, false) NoArgs;
    26 EXP Exp "exp" (1, 0, false) NoArgs;
    27 LOG Log "log" (1, 0, false) NoArgs;
    28 SQRT Sqrt "sqrt" (1, 0, false) NoArgs;
    29 RSQRT Rsqrt "rsqrt" (1, 0, false) NoArgs;
    30 ABS Abs "abs" (1, 0, false) NoArgs;
    31 SIN Sin "sin" (1, 0, false) NoArgs;
    32 COS Cos "cos" (1, 0, false) NoArgs;
    33 TANH Tanh "tanh" (1, 0, false) NoArgs;
    34 SIGMOID Sigmoid "sigmoid" (1, 0, false) NoArgs;
    35 SILU Silu "silu" (1, 0, false) NoArgs;
    36 GELU Gelu "gelu" (1, 0, false) Gelu;
    37 QUICK_GELU QuickGelu "quick_gelu" (1, 0, false) NoArgs;
    38 RELU Relu "relu" (1, 0, false) NoArgs;
    39 CLAMP Clamp "clamp" (1, 0, false) Clamp;
    40 GT Gt "gt" (1, 1, false) Binary;
    41 GE Ge "ge" (1, 1, false) Binary;
    42 LT Lt "lt" (1, 1, false) Binary;
    43 LE Le "le" (1, 1, false) Binary;
    44 EQ Eq "eq" (1, 1, false) Binary;
    45 WHERE Where "where" (3, 0, false) NoArgs;
    46 SUM Sum "sum" (1, 0, false) Reduce;
    47 MEAN Mean "mean" (1, 0, false) Reduce;
    48 MAX Max "max" (1, 0, false) Reduce;
    49 VAR Var "var" (1, 0, false) Var;
    50 MATMUL Matmul "matmul" (2, 0, false) NoArgs;
    51 LINEAR Linear "linear" (2, 1, false) NoArgs;
    52 CONV2D Conv2d "conv2d" (2, 1, false) Conv;
    53 CONV_TRANSPOSE2D ConvTranspose2d "conv_transpose2d" (2, 1, false) ConvTranspose;
    54 GROUP_NORM GroupNorm "group_norm" (1, 2, false) GroupNorm;
    55 LAYER_NORM LayerNorm "layer_norm" (1, 2, false) Norm;
    56 RMS_NORM RmsNorm "rms_norm" (1, 1, false) Norm;
    57 SOFTMAX Softmax "softmax" (1, 0, false) Dim;
    58 ATTENTION Attention "attention" (3, 1, false) Attention;
    59 INTERPOLATE Interpolate "interpolate" (1, 0, false) Interpolate;
    60 DROPOUT Dropout "dropout" (1, 0, false) Dropout;
    61 EMBEDDING Embedding "embedding" (2, 0, false) NoArgs;
    62 CAST Cast "cast" (1, 0, false) Cast;
    63 TO_DEVICE ToDevice "to_device" (1, 0, false) ToDevice;
    64 DETACH Detach "detach" (1, 0, false) NoArgs;
    65 SET_REQUIRES_GRAD SetRequiresGrad "set_requires_grad" (1, 0, false) RequiresGrad;
    66 BACKWARD Backward "backward" (1, 0, false) NoArgs;
    67 GRAD Grad "grad" (2, 0, false) NoArgs;
    68 ASSIGN Assign "assign" (2, 0, false) NoArgs;
    // 1.2: gradient checkpointing of a block (see `host::checkpoint`).
    69 CHECKPOINT_BEGIN CheckpointBegin "checkpoint_begin" (0, 0, false) NoArgs;
    70 CHECKPOINT_END CheckpointEnd "checkpoint_end" (0, 0, true) NoArgs;
    71 WEIGHT_LOADED WeightLoaded "weight_loaded" (1, 0, false) Part;
    72 GROUP_NORM_SILU GroupNormSilu "group_norm_silu" (1, 2, false) GroupNorm;
    // 1.5: a region computed in the fallback dtype where the train dtype is float16 (see
    // `host::without_float16`).
    73 FALLBACK_BEGIN FallbackBegin "fallback_begin" (0, 0, false) NoArgs;
    74 FALLBACK_END FallbackEnd "fallback_end" (0, 0, false) NoArgs;
    // 1.7: multi-tensor ops (torch's `_foreach_*`): one call over a list of tensors, the lists
    // one after another (x₁..xₙ, y₁..yₙ[, z₁..zₙ]); an optimizer step is a few calls per group.
    75 FOREACH_AXPBY ForeachAxpby "foreach_axpby" (2, 0, true) Axpby;
    76 FOREACH_ADDCMUL ForeachAddcmul "foreach_addcmul" (3, 0, true) Axpby;
    77 FOREACH_ADDCDIV_SQRT ForeachAddcdivSqrt "foreach_addcdiv_sqrt" (3, 0, true) AddcdivSqrt;
    // foreach_assign puts y₁..yₙ into x₁..xₙ (as `assign`).
    78 FOREACH_ASSIGN ForeachAssign "foreach_assign" (2, 0, true) NoArgs;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_the_table() {
        let op = Op::ConvTranspose2d(ConvTranspose {
            stride: [2, 2],
            padding: [1, 1],
            output_padding: [1, 0],
            dilation: [1, 1],
            groups: 1,
        });
        let back = Op::decode(op.code(), 3, &op.encode()).unwrap();
        assert_eq!(back, op);
        let clamp = Op::Clamp(Clamp {
            min: None,
            max: Some(1.0),
        });
        assert_eq!(Op::decode(clamp.code(), 1, &clamp.encode()).unwrap(), clamp);
    }

    #[test]
    fn decoding_names_the_op_and_attribute() {
        let attrs: RVec<Attr_NE> = vec![Attr_NE::new(Attr::Float(1.0))].into();
        let e = Op::decode(OpCode::SOFTMAX, 1, &attrs).unwrap_err();
        assert!(e.contains("softmax") && e.contains("`dim`"), "{e}");
        let e = Op::decode(OpCode::SOFTMAX, 2, &attrs).unwrap_err();
        assert!(e.contains("expected 1 tensor inputs, got 2"), "{e}");
        let e = Op::decode(OpCode(9999), 1, &attrs).unwrap_err();
        assert!(e.contains("9999") && e.contains("newer plugin-api"), "{e}");
        let two = [Attr_NE::new(Attr::Int(0)), Attr_NE::new(Attr::Int(1))];
        let e = Op::decode(OpCode::SOFTMAX, 1, &two).unwrap_err();
        assert!(e.contains("2 attributes"), "{e}");
    }
}

//! Op codes. Codes are never reused or renumbered; new ops are appended.

use crate::abi::OpCode;

impl OpCode {
    pub const ZEROS: OpCode = OpCode(1);
    pub const ONES: OpCode = OpCode(2);
    pub const FULL: OpCode = OpCode(3);
    pub const ARANGE: OpCode = OpCode(4);
    pub const RANDN: OpCode = OpCode(5);
    pub const RAND: OpCode = OpCode(6);
    pub const FROM_F32: OpCode = OpCode(7);
    pub const FROM_I64: OpCode = OpCode(8);
    pub const RESHAPE: OpCode = OpCode(9);
    pub const PERMUTE: OpCode = OpCode(10);
    pub const TRANSPOSE: OpCode = OpCode(11);
    pub const NARROW: OpCode = OpCode(12);
    pub const CAT: OpCode = OpCode(13);
    pub const STACK: OpCode = OpCode(14);
    pub const CHUNK: OpCode = OpCode(15);
    pub const EXPAND: OpCode = OpCode(16);
    pub const INDEX_SELECT: OpCode = OpCode(17);
    pub const GATHER: OpCode = OpCode(18);
    pub const PAD: OpCode = OpCode(19);
    pub const ADD: OpCode = OpCode(20);
    pub const SUB: OpCode = OpCode(21);
    pub const MUL: OpCode = OpCode(22);
    pub const DIV: OpCode = OpCode(23);
    pub const POW: OpCode = OpCode(24);
    pub const NEG: OpCode = OpCode(25);
    pub const EXP: OpCode = OpCode(26);
    pub const LOG: OpCode = OpCode(27);
    pub const SQRT: OpCode = OpCode(28);
    pub const RSQRT: OpCode = OpCode(29);
    pub const ABS: OpCode = OpCode(30);
    pub const SIN: OpCode = OpCode(31);
    pub const COS: OpCode = OpCode(32);
    pub const TANH: OpCode = OpCode(33);
    pub const SIGMOID: OpCode = OpCode(34);
    pub const SILU: OpCode = OpCode(35);
    pub const GELU: OpCode = OpCode(36);
    pub const QUICK_GELU: OpCode = OpCode(37);
    pub const RELU: OpCode = OpCode(38);
    pub const CLAMP: OpCode = OpCode(39);
    pub const GT: OpCode = OpCode(40);
    pub const GE: OpCode = OpCode(41);
    pub const LT: OpCode = OpCode(42);
    pub const LE: OpCode = OpCode(43);
    pub const EQ: OpCode = OpCode(44);
    pub const WHERE: OpCode = OpCode(45);
    pub const SUM: OpCode = OpCode(46);
    pub const MEAN: OpCode = OpCode(47);
    pub const MAX: OpCode = OpCode(48);
    pub const VAR: OpCode = OpCode(49);
    pub const MATMUL: OpCode = OpCode(50);
    pub const LINEAR: OpCode = OpCode(51);
    pub const CONV2D: OpCode = OpCode(52);
    pub const CONV_TRANSPOSE2D: OpCode = OpCode(53);
    pub const GROUP_NORM: OpCode = OpCode(54);
    pub const LAYER_NORM: OpCode = OpCode(55);
    pub const RMS_NORM: OpCode = OpCode(56);
    pub const SOFTMAX: OpCode = OpCode(57);
    pub const ATTENTION: OpCode = OpCode(58);
    pub const INTERPOLATE: OpCode = OpCode(59);
    pub const DROPOUT: OpCode = OpCode(60);
    pub const EMBEDDING: OpCode = OpCode(61);
    pub const CAST: OpCode = OpCode(62);
    pub const TO_DEVICE: OpCode = OpCode(63);
    pub const DETACH: OpCode = OpCode(64);
    pub const SET_REQUIRES_GRAD: OpCode = OpCode(65);
    pub const BACKWARD: OpCode = OpCode(66);
    pub const GRAD: OpCode = OpCode(67);
    pub const ASSIGN: OpCode = OpCode(68);

    /// All known ops, for error messages and benchmarks.
    pub const ALL: &[(OpCode, &str)] = &[
        (OpCode::ZEROS, "zeros"),
        (OpCode::ONES, "ones"),
        (OpCode::FULL, "full"),
        (OpCode::ARANGE, "arange"),
        (OpCode::RANDN, "randn"),
        (OpCode::RAND, "rand"),
        (OpCode::FROM_F32, "from_f32"),
        (OpCode::FROM_I64, "from_i64"),
        (OpCode::RESHAPE, "reshape"),
        (OpCode::PERMUTE, "permute"),
        (OpCode::TRANSPOSE, "transpose"),
        (OpCode::NARROW, "narrow"),
        (OpCode::CAT, "cat"),
        (OpCode::STACK, "stack"),
        (OpCode::CHUNK, "chunk"),
        (OpCode::EXPAND, "expand"),
        (OpCode::INDEX_SELECT, "index_select"),
        (OpCode::GATHER, "gather"),
        (OpCode::PAD, "pad"),
        (OpCode::ADD, "add"),
        (OpCode::SUB, "sub"),
        (OpCode::MUL, "mul"),
        (OpCode::DIV, "div"),
        (OpCode::POW, "pow"),
        (OpCode::NEG, "neg"),
        (OpCode::EXP, "exp"),
        (OpCode::LOG, "log"),
        (OpCode::SQRT, "sqrt"),
        (OpCode::RSQRT, "rsqrt"),
        (OpCode::ABS, "abs"),
        (OpCode::SIN, "sin"),
        (OpCode::COS, "cos"),
        (OpCode::TANH, "tanh"),
        (OpCode::SIGMOID, "sigmoid"),
        (OpCode::SILU, "silu"),
        (OpCode::GELU, "gelu"),
        (OpCode::QUICK_GELU, "quick_gelu"),
        (OpCode::RELU, "relu"),
        (OpCode::CLAMP, "clamp"),
        (OpCode::GT, "gt"),
        (OpCode::GE, "ge"),
        (OpCode::LT, "lt"),
        (OpCode::LE, "le"),
        (OpCode::EQ, "eq"),
        (OpCode::WHERE, "where"),
        (OpCode::SUM, "sum"),
        (OpCode::MEAN, "mean"),
        (OpCode::MAX, "max"),
        (OpCode::VAR, "var"),
        (OpCode::MATMUL, "matmul"),
        (OpCode::LINEAR, "linear"),
        (OpCode::CONV2D, "conv2d"),
        (OpCode::CONV_TRANSPOSE2D, "conv_transpose2d"),
        (OpCode::GROUP_NORM, "group_norm"),
        (OpCode::LAYER_NORM, "layer_norm"),
        (OpCode::RMS_NORM, "rms_norm"),
        (OpCode::SOFTMAX, "softmax"),
        (OpCode::ATTENTION, "attention"),
        (OpCode::INTERPOLATE, "interpolate"),
        (OpCode::DROPOUT, "dropout"),
        (OpCode::EMBEDDING, "embedding"),
        (OpCode::CAST, "cast"),
        (OpCode::TO_DEVICE, "to_device"),
        (OpCode::DETACH, "detach"),
        (OpCode::SET_REQUIRES_GRAD, "set_requires_grad"),
        (OpCode::BACKWARD, "backward"),
        (OpCode::GRAD, "grad"),
        (OpCode::ASSIGN, "assign"),
    ];

    pub fn name(self) -> &'static str {
        OpCode::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("unknown", |(_, n)| n)
    }
}

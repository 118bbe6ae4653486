//! A minimal pickle reader for `torch.save` checkpoints that never imports or calls anything.
//!
//! It runs the few opcodes torch writes (protocols 2 to 5) over plain data — dicts, lists,
//! tuples, numbers, strings — and turns the handful of torch globals it knows
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and friends, `torch.*Storage`)
//! into inert descriptions of storages and tensors. Any other opcode or global, a call with the
//! wrong number of arguments, or malformed bytes is an error naming the opcode or global and its
//! byte offset; nothing in the input is ever executed. Stack, memo and object counts are bounded,
//! and containers refer to each other by index into one arena, so no input can recurse, loop or
//! panic. This module knows nothing of zip archives or memory maps: [`super::pth`] turns the
//! descriptions into tensors.

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use anyhow::{anyhow, Result};

use crate::tensor::DType;

/// Most values the pickle stack may hold at once (torch needs about 2,000: one SETITEMS batch).
pub const MAX_STACK: usize = 1 << 16;
/// Most memo entries (torch writes about 20 per tensor).
pub const MAX_MEMO: usize = 1 << 22;
/// Most containers, storages and tensors one pickle may build.
pub const MAX_OBJECTS: usize = 1 << 24;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 64;

/// A value on the pickle stack. Containers live in [`Pickle`]'s arena and are named by index.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    /// One of the allowed globals, never called except as a known constructor.
    Global(Global),
    /// A container, storage or tensor in the arena.
    Obj(ObjId),
}

/// Index of an object in a [`Pickle`]'s arena; only the reader creates these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjId(usize);

/// Something built by the pickle: a container or a torch storage/tensor description.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict or `OrderedDict`, items in insertion order; a repeated key keeps the last value.
    Dict(Vec<(Value, Value)>),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// The globals a torch checkpoint may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`, called with no arguments.
    OrderedDict,
    /// `torch._utils._rebuild_tensor(storage, offset, size, stride)`.
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state(tensor, requires_grad, hooks, state)`.
    RebuildParameterWithState,
    /// A `torch.<Name>Storage` class, only ever used inside a persistent id.
    Storage(StorageType),
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Global::OrderedDict => f.write_str("collections.OrderedDict"),
            Global::RebuildTensor => f.write_str("torch._utils._rebuild_tensor"),
            Global::RebuildTensorV2 => f.write_str("torch._utils._rebuild_tensor_v2"),
            Global::RebuildParameter => f.write_str("torch._utils._rebuild_parameter"),
            Global::RebuildParameterWithState => f.write_str("torch._utils._rebuild_parameter_with_state"),
            Global::Storage(ty) => write!(f, "torch.{}", ty.name),
        }
    }
}

/// A `torch.<Name>Storage` class: its name and, when gyre reads it, the element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageType {
    /// The class name, e.g. `FloatStorage`.
    pub name: &'static str,
    /// The torch dtype name, e.g. `float32`.
    pub torch_dtype: &'static str,
    /// The element type, or `None` for dtypes gyre does not read (int64, float64, ...).
    pub dtype: Option<DType>,
}

/// The typed storage classes torch pickles (`TypedStorage._pickle_storage_type`).
const STORAGE_TYPES: &[StorageType] = &[
    StorageType {
        name: "FloatStorage",
        torch_dtype: "float32",
        dtype: Some(DType::F32),
    },
    StorageType {
        name: "HalfStorage",
        torch_dtype: "float16",
        dtype: Some(DType::F16),
    },
    StorageType {
        name: "BFloat16Storage",
        torch_dtype: "bfloat16",
        dtype: Some(DType::BF16),
    },
    StorageType {
        name: "DoubleStorage",
        torch_dtype: "float64",
        dtype: None,
    },
    StorageType {
        name: "LongStorage",
        torch_dtype: "int64",
        dtype: None,
    },
    StorageType {
        name: "IntStorage",
        torch_dtype: "int32",
        dtype: None,
    },
    StorageType {
        name: "ShortStorage",
        torch_dtype: "int16",
        dtype: None,
    },
    StorageType {
        name: "CharStorage",
        torch_dtype: "int8",
        dtype: None,
    },
    StorageType {
        name: "ByteStorage",
        torch_dtype: "uint8",
        dtype: None,
    },
    StorageType {
        name: "BoolStorage",
        torch_dtype: "bool",
        dtype: None,
    },
    StorageType {
        name: "ComplexFloatStorage",
        torch_dtype: "complex64",
        dtype: None,
    },
    StorageType {
        name: "ComplexDoubleStorage",
        torch_dtype: "complex128",
        dtype: None,
    },
    StorageType {
        name: "QInt8Storage",
        torch_dtype: "qint8",
        dtype: None,
    },
    StorageType {
        name: "QUInt8Storage",
        torch_dtype: "quint8",
        dtype: None,
    },
    StorageType {
        name: "QInt32Storage",
        torch_dtype: "qint32",
        dtype: None,
    },
];

/// A persistent-id storage reference: `('storage', torch.<T>Storage, key, location, numel)`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    /// The storage class, which fixes the element type.
    pub ty: StorageType,
    /// The archive key: the storage's bytes are the entry `<archive>/data/<key>`.
    pub key: Rc<str>,
    /// Elements in the storage.
    pub numel: u64,
}

/// A tensor description: a strided view of a storage, as `_rebuild_tensor_v2` receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The storage the tensor views.
    pub storage: StorageRef,
    /// Offset of the first element, in elements.
    pub offset: u64,
    /// Size of each dimension, outermost first.
    pub shape: Vec<u64>,
    /// Stride of each dimension, in elements.
    pub stride: Vec<u64>,
}

/// The result of reading a pickle: the root value and the arena its containers live in.
#[derive(Debug)]
pub struct Pickle {
    /// The value `STOP` returned.
    pub root: Value,
    objects: Vec<Object>,
}

impl Pickle {
    /// The object `id` names.
    pub fn object(&self, id: ObjId) -> &Object {
        // Ids are only made by `Reader::alloc`, which pushes the object first: always in range.
        &self.objects[id.0]
    }

    /// The object a value names, when it is one.
    pub fn object_of(&self, value: &Value) -> Option<&Object> {
        match value {
            Value::Obj(id) => Some(self.object(*id)),
            _ => None,
        }
    }

    /// A short description of a value's type, for messages.
    pub fn kind(&self, value: &Value) -> &'static str {
        kind(&self.objects, value)
    }
}

fn kind(objects: &[Object], value: &Value) -> &'static str {
    match value {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Global(_) => "global",
        Value::Obj(id) => match objects.get(id.0) {
            Some(Object::List(_)) => "list",
            Some(Object::Tuple(_)) => "tuple",
            Some(Object::Dict(_)) => "dict",
            Some(Object::Storage(_)) => "storage",
            Some(Object::Tensor(_)) => "tensor",
            None => "object",
        },
    }
}

/// Reads a whole pickle (e.g. a `.pth` archive's `data.pkl`) without executing anything.
pub fn parse(data: &[u8]) -> Result<Pickle> {
    let mut reader = Reader {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
    };
    loop {
        let at = reader.pos;
        let Some(&op) = data.get(at) else {
            return Err(anyhow!(
                "the pickle ends at byte {at} without a STOP opcode: data.pkl is truncated"
            ));
        };
        reader.pos += 1;
        match reader.step(op) {
            Ok(Some(root)) => {
                return Ok(Pickle {
                    root,
                    objects: reader.objects,
                })
            }
            Ok(None) => {}
            Err(msg) => return Err(anyhow!("pickle opcode {} at byte {at}: {msg}", opcode_name(op))),
        }
    }
}

/// The name `pickletools` gives an opcode byte.
fn opcode_name(op: u8) -> String {
    let name = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'(' => "MARK",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'G' => "BINFLOAT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        // Opcodes that exist but that torch checkpoints never need.
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'P' => "PERSID",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8b => "LONG4",
        b'l' => "LIST",
        b'd' => "DICT",
        b'g' => "GET",
        b'p' => "PUT",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        _ => return format!("0x{op:02x} (not a pickle opcode)"),
    };
    format!("{name} (0x{op:02x})")
}

/// Quotes untrusted text for a message: escaped and cut to a readable length.
fn quote(text: &str) -> String {
    let mut out: String = text.chars().take(80).flat_map(char::escape_debug).collect();
    if text.chars().count() > 80 {
        out.push_str("...");
    }
    format!("'{out}'")
}

/// Errors inside one opcode; `parse` adds the opcode and its offset.
type Step<T> = std::result::Result<T, String>;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.data.len());
        let Some(end) = end else {
            return Err(format!(
                "needs {n} more bytes but the pickle has {} left: data.pkl is truncated",
                self.data.len() - self.pos
            ));
        };
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Step<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| format!("length {n} does not fit in memory"))
    }

    fn string(&mut self, len: usize) -> Step<Value> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|e| format!("string is not UTF-8 ({e})"))?;
        Ok(Value::Str(Rc::from(text)))
    }

    fn line(&mut self) -> Step<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err("the global's name has no terminating newline: data.pkl is truncated".into());
        };
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|e| format!("the global's name is not UTF-8 ({e})"))
    }

    fn push(&mut self, value: Value) -> Step<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("the pickle stack is deeper than {MAX_STACK} values"));
        }
        self.stack.push(value);
        Ok(())
    }

    /// Pops one value; never reaches below the innermost open MARK.
    fn pop(&mut self) -> Step<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("the pickle stack is empty here (stack underflow)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Step<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("the pickle stack is empty here (stack underflow)".into());
        }
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    /// Pops everything down to the innermost MARK, and the MARK.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err("no MARK is open".into());
        };
        // Pops never go below the innermost mark, so `mark <= len`.
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn alloc(&mut self, object: Object) -> Step<Value> {
        if self.objects.len() >= MAX_OBJECTS {
            return Err(format!("the pickle builds more than {MAX_OBJECTS} objects"));
        }
        self.objects.push(object);
        Ok(Value::Obj(ObjId(self.objects.len() - 1)))
    }

    fn push_new(&mut self, object: Object) -> Step<()> {
        let value = self.alloc(object)?;
        self.push(value)
    }

    fn memo_put(&mut self, index: u32) -> Step<()> {
        let value = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(format!("the memo holds more than {MAX_MEMO} entries"));
        }
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Step<()> {
        let value = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| format!("memo entry {index} was never stored"))?;
        self.push(value)
    }

    fn kind(&self, value: &Value) -> &'static str {
        kind(&self.objects, value)
    }

    /// The items of a tuple value, borrowed.
    fn tuple(&self, value: &Value, what: &str) -> Step<&[Value]> {
        match value {
            Value::Obj(id) => match self.objects.get(id.0) {
                Some(Object::Tuple(items)) => Ok(items),
                _ => Err(format!("{what} must be a tuple, found a {}", self.kind(value))),
            },
            _ => Err(format!("{what} must be a tuple, found a {}", self.kind(value))),
        }
    }

    /// True when `value` names a tensor description.
    fn is_tensor(&self, value: &Value) -> bool {
        matches!(value, Value::Obj(id) if matches!(self.objects.get(id.0), Some(Object::Tensor(_))))
    }

    fn dict_mut(&mut self, target: &Value, op: &str) -> Step<&mut Vec<(Value, Value)>> {
        let found = self.kind(target);
        match target {
            Value::Obj(id) => match self.objects.get_mut(id.0) {
                Some(Object::Dict(items)) => Ok(items),
                _ => Err(format!("{op} needs a dict below its items, found a {found}")),
            },
            _ => Err(format!("{op} needs a dict below its items, found a {found}")),
        }
    }

    fn list_mut(&mut self, target: &Value, op: &str) -> Step<&mut Vec<Value>> {
        let found = self.kind(target);
        match target {
            Value::Obj(id) => match self.objects.get_mut(id.0) {
                Some(Object::List(items)) => Ok(items),
                _ => Err(format!("{op} needs a list below its items, found a {found}")),
            },
            _ => Err(format!("{op} needs a list below its items, found a {found}")),
        }
    }

    /// Runs one opcode; returns the root value at STOP.
    fn step(&mut self, op: u8) -> Step<Option<Value>> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if !(2..=5).contains(&proto) {
                    return Err(format!(
                        "pickle protocol {proto}; torch.save writes protocols 2 to 5"
                    ));
                }
            }
            0x95 => {
                self.take(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => {
                if self.marks.len() >= MAX_STACK {
                    return Err(format!("more than {MAX_STACK} nested MARKs"));
                }
                self.marks.push(self.stack.len());
            }
            b'}' => self.push_new(Object::Dict(Vec::new()))?,
            b']' => self.push_new(Object::List(Vec::new()))?,
            b')' => self.push_new(Object::Tuple(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_new(Object::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push_new(Object::Tuple(items))?;
            }
            b'X' => {
                let len = self.u32()? as usize;
                let s = self.string(len)?;
                self.push(s)?;
            }
            0x8c => {
                let len = usize::from(self.u8()?);
                let s = self.string(len)?;
                self.push(s)?;
            }
            0x8d => {
                let len = self.len_u64()?;
                let s = self.string(len)?;
                self.push(s)?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(i64::from(v)))?;
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(i64::from(v)))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(i64::from(v)))?;
            }
            0x8a => {
                let n = usize::from(self.u8()?);
                if n > 8 {
                    return Err(format!("a {n}-byte integer is too large for gyre"));
                }
                let bytes = self.take(n)?;
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(bytes);
                // Two's complement, little-endian: sign-extend from the last byte.
                if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
                    buf[n..].fill(0xff);
                }
                self.push(Value::Int(i64::from_le_bytes(buf)))?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.push(Value::Float(v))?;
            }
            b'q' => {
                let index = u32::from(self.u8()?);
                self.memo_put(index)?;
            }
            b'r' => {
                let index = self.u32()?;
                self.memo_put(index)?;
            }
            0x94 => {
                let index = u32::try_from(self.memo.len()).map_err(|_| "memo is full")?;
                self.memo_put(index)?;
            }
            b'h' => {
                let index = u32::from(self.u8()?);
                self.memo_get(index)?;
            }
            b'j' => {
                let index = self.u32()?;
                self.memo_get(index)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let global = resolve_global(module, name)?;
                self.push(Value::Global(global))?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    return Err(format!(
                        "STACK_GLOBAL needs two strings, found a {} and a {}",
                        self.kind(&module),
                        self.kind(&name)
                    ));
                };
                let global = resolve_global(module, name)?;
                self.push(Value::Global(global))?;
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let value = self.reduce(&callable, &args)?;
                self.push(value)?;
            }
            b'b' => {
                // Only `OrderedDict` instance state (`state_dict()._metadata`) is ever built;
                // it describes module versions, not tensors, so it is dropped.
                let _state = self.pop()?;
                let target = self.top()?.clone();
                self.dict_mut(&target, "BUILD")?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent_storage(&pid)?;
                self.push_new(Object::Storage(storage))?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let target = self.top()?.clone();
                self.dict_mut(&target, "SETITEM")?.push((key, value));
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(format!(
                        "SETITEMS got {} values, not key/value pairs",
                        items.len()
                    ));
                }
                let target = self.top()?.clone();
                let dict = self.dict_mut(&target, "SETITEMS")?;
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    dict.push((k, v));
                }
            }
            b'a' => {
                let value = self.pop()?;
                let target = self.top()?.clone();
                self.list_mut(&target, "APPEND")?.push(value);
            }
            b'e' => {
                let items = self.pop_mark()?;
                let target = self.top()?.clone();
                self.list_mut(&target, "APPENDS")?.extend(items);
            }
            _ => {
                return Err(
                    "this opcode is not allowed: gyre reads only the opcodes torch.save \
                            writes for dicts of tensors"
                        .into(),
                )
            }
        }
        Ok(None)
    }

    /// `callable(*args)` for the allowed globals, which only build descriptions.
    fn reduce(&mut self, callable: &Value, args: &Value) -> Step<Value> {
        let Value::Global(global) = callable else {
            return Err(format!(
                "REDUCE needs a global to call, found a {}",
                self.kind(callable)
            ));
        };
        let args = self.tuple(args, &format!("the arguments of {global}"))?;
        let allowed: &[usize] = match global {
            Global::OrderedDict => &[0],
            Global::RebuildTensor => &[4],
            Global::RebuildTensorV2 => &[6, 7],
            Global::RebuildParameter => &[3],
            Global::RebuildParameterWithState => &[4],
            Global::Storage(_) => {
                return Err(format!(
                    "{global} is only a storage type name; a checkpoint may not call it"
                ))
            }
        };
        if !allowed.contains(&args.len()) {
            let want: Vec<String> = allowed.iter().map(|n| n.to_string()).collect();
            return Err(format!(
                "{global} called with {} arguments; torch passes {}",
                args.len(),
                want.join(" or ")
            ));
        }
        match global {
            Global::OrderedDict => self.alloc(Object::Dict(Vec::new())),
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                if self.is_tensor(&args[0]) {
                    Ok(args[0].clone())
                } else {
                    Err(format!(
                        "{global} needs a tensor, found a {}",
                        self.kind(&args[0])
                    ))
                }
            }
            _ => {
                let tensor = self.tensor(args)?;
                self.alloc(Object::Tensor(tensor))
            }
        }
    }

    /// The tensor of `_rebuild_tensor[_v2](storage, offset, size, stride, ...)`; `args` has at
    /// least four items.
    fn tensor(&self, args: &[Value]) -> Step<TensorRef> {
        let storage = match &args[0] {
            Value::Obj(id) => match self.objects.get(id.0) {
                Some(Object::Storage(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        };
        let Some(storage) = storage else {
            return Err(format!(
                "a tensor's first argument must be a storage, found a {}",
                self.kind(&args[0])
            ));
        };
        let offset = non_negative(&args[1], "storage offset")?;
        let shape = self.dims(&args[2], "size")?;
        let stride = self.dims(&args[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(format!(
                "a tensor has {} sizes but {} strides",
                shape.len(),
                stride.len()
            ));
        }
        Ok(TensorRef {
            storage,
            offset,
            shape,
            stride,
        })
    }

    fn dims(&self, value: &Value, what: &str) -> Step<Vec<u64>> {
        let items = self.tuple(value, &format!("a tensor's {what}"))?;
        if items.len() > MAX_DIMS {
            return Err(format!(
                "a tensor has {} dimensions (at most {MAX_DIMS})",
                items.len()
            ));
        }
        items.iter().map(|v| non_negative(v, what)).collect()
    }

    /// The storage named by a `BINPERSID` id: `('storage', torch.<T>Storage, key, location, numel)`.
    fn persistent_storage(&self, pid: &Value) -> Step<StorageRef> {
        let items = self.tuple(pid, "a persistent id")?;
        match items {
            [Value::Str(tag), Value::Global(Global::Storage(ty)), Value::Str(key), Value::Str(_), numel]
                if &**tag == "storage" =>
            {
                Ok(StorageRef {
                    ty: *ty,
                    key: key.clone(),
                    numel: non_negative(numel, "storage size")?,
                })
            }
            _ => Err(format!(
                "a persistent id must be ('storage', torch.<Type>Storage, key, location, size); \
                 found a {}-tuple of unexpected values",
                items.len()
            )),
        }
    }
}

fn non_negative(value: &Value, what: &str) -> Step<u64> {
    match value {
        Value::Int(v) => u64::try_from(*v).map_err(|_| format!("a tensor's {what} is negative ({v})")),
        _ => Err(format!("a tensor's {what} must be an int")),
    }
}

/// The allowed globals; everything else is refused without being looked up.
fn resolve_global(module: &str, name: &str) -> Step<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => return Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor") => return Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_tensor_v2") => return Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => return Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => return Ok(Global::RebuildParameterWithState),
        ("torch._utils", "_rebuild_tensor_v3") => {
            return Err(
                "global 'torch._utils._rebuild_tensor_v3': the checkpoint holds a tensor \
                        of a dtype gyre does not read (torch uses it only for uint16/32/64 and \
                        float8 types); convert the weights to float32, float16 or bfloat16 and \
                        save again"
                    .into(),
            )
        }
        _ => {}
    }
    if module == "torch" {
        if let Some(ty) = STORAGE_TYPES.iter().find(|t| t.name == name) {
            return Ok(Global::Storage(*ty));
        }
    }
    Err(format!(
        "forbidden global {}: gyre never imports or calls anything from a checkpoint and reads \
         only dicts of tensors (save `model.state_dict()`, not the model object)",
        quote(&format!("{module}.{name}"))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny pickle writer for tests: opcodes by hand.
    fn unicode(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
        out
    }

    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    /// `{name: _rebuild_tensor_v2(storage('0', numel), offset, size, stride, False, OrderedDict())}`.
    fn tensor_dict(numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0];
        p.extend(unicode("w"));
        p.extend(global("torch._utils", "_rebuild_tensor_v2"));
        p.push(b'(');
        p.push(b'(');
        p.extend(unicode("storage"));
        p.extend(global("torch", "FloatStorage"));
        p.extend(unicode("0"));
        p.extend(unicode("cpu"));
        p.extend([b'K', numel, b't', b'Q', b'K', offset, b'(']);
        for &s in size {
            p.extend([b'K', s]);
        }
        p.extend([b't', b'(']);
        for &s in stride {
            p.extend([b'K', s]);
        }
        p.extend([b't', 0x89]);
        p.extend(global("collections", "OrderedDict"));
        p.extend([b')', b'R', b't', b'R', b's', b'.']);
        p
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", parse(bytes).expect_err("must fail"))
    }

    #[test]
    fn reads_a_tensor_description() {
        let p = parse(&tensor_dict(12, 2, &[2, 5], &[5, 1])).unwrap();
        let Some(Object::Dict(items)) = p.object_of(&p.root) else {
            panic!("root is not a dict")
        };
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, Value::Str("w".into()));
        let Some(Object::Tensor(t)) = p.object_of(&items[0].1) else {
            panic!("not a tensor")
        };
        assert_eq!(t.storage.ty.dtype, Some(DType::F32));
        assert_eq!(&*t.storage.key, "0");
        assert_eq!((t.storage.numel, t.offset), (12, 2));
        assert_eq!((t.shape.clone(), t.stride.clone()), (vec![2, 5], vec![5, 1]));
    }

    #[test]
    fn scalars_memo_and_protocol_4_forms() {
        // PROTO 4, FRAME, MEMOIZE, SHORT_BINUNICODE, BINGET, LONG1 (negative), BINFLOAT, lists.
        let mut p = vec![0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, b'}', 0x94, b'('];
        p.extend([0x8c, 1, b'a', 0x94, 0x8a, 2, 0x00, 0x80]); // -32768
        p.extend([0x8c, 1, b'b', b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([
            0x8c, 1, b'c', b']', b'(', b'N', 0x88, b'M', 0x34, 0x12, b'e', b'h', 1, b'a',
        ]);
        p.extend([b'u', b'.']);
        let r = parse(&p).unwrap();
        let Some(Object::Dict(items)) = r.object_of(&r.root) else {
            panic!()
        };
        assert_eq!(items[0].1, Value::Int(-32768));
        assert_eq!(items[1].1, Value::Float(1.5));
        let Some(Object::List(list)) = r.object_of(&items[2].1) else {
            panic!()
        };
        assert_eq!(
            list,
            &vec![
                Value::None,
                Value::Bool(true),
                Value::Int(0x1234),
                Value::Str("a".into())
            ]
        );
    }

    #[test]
    fn forbidden_globals_are_named_and_never_resolved() {
        let mut p = vec![0x80, 2];
        p.extend(global("os", "system"));
        p.extend(unicode("echo pwned"));
        p.extend([0x85, b'R', b'.']);
        let e = err(&p);
        assert!(
            e.contains("forbidden global 'os.system'") && e.contains("byte 2"),
            "{e}"
        );
        // The same through STACK_GLOBAL.
        let mut p = vec![0x80, 4];
        p.extend([0x8c, 8]);
        p.extend(b"builtins");
        p.extend([0x8c, 4]);
        p.extend(b"eval");
        p.extend([0x93, b'.']);
        let e = err(&p);
        assert!(e.contains("'builtins.eval'") && e.contains("STACK_GLOBAL"), "{e}");
        let e = err(&[
            &[0x80, 2][..],
            &global("torch._utils", "_rebuild_tensor_v3"),
            b".",
        ]
        .concat());
        assert!(e.contains("_rebuild_tensor_v3") && e.contains("dtype"), "{e}");
    }

    #[test]
    fn unknown_opcodes_and_bad_arity_are_errors() {
        let e = err(&[0x80, 2, b'}', 0x81, b'.']);
        assert!(e.contains("NEWOBJ (0x81)") && e.contains("byte 3"), "{e}");
        let e = err(&[0x80, 2, 0xff]);
        assert!(e.contains("0xff") && e.contains("byte 2"), "{e}");
        // OrderedDict called with an argument.
        let mut p = vec![0x80, 2];
        p.extend(global("collections", "OrderedDict"));
        p.extend([b'K', 1, 0x85, b'R', b'.']);
        let e = err(&p);
        assert!(
            e.contains("collections.OrderedDict called with 1 arguments"),
            "{e}"
        );
        // _rebuild_tensor_v2 with only 3 arguments.
        let mut p = vec![0x80, 2];
        p.extend(global("torch._utils", "_rebuild_tensor_v2"));
        p.extend([b'K', 1, b'K', 2, b'K', 3, 0x87, b'R', b'.']);
        let e = err(&p);
        assert!(e.contains("_rebuild_tensor_v2 called with 3 arguments"), "{e}");
        // Calling a storage class.
        let mut p = vec![0x80, 2];
        p.extend(global("torch", "FloatStorage"));
        p.extend([b')', b'R', b'.']);
        assert!(err(&p).contains("may not call it"));
        // A negative size.
        let mut bad = tensor_dict(4, 0, &[2, 2], &[2, 1]);
        let at = bad.windows(4).position(|w| w == [b'(', b'K', 2, b'K']).unwrap();
        bad.splice(at + 1..at + 3, [b'J', 0xff, 0xff, 0xff, 0xff]);
        assert!(err(&bad).contains("size is negative (-1)"), "{}", err(&bad));
    }

    #[test]
    fn structural_errors_do_not_panic() {
        assert!(err(&[]).contains("without a STOP"));
        assert!(err(&[0x80, 1, b'.']).contains("protocol 1"));
        assert!(err(&[0x80, 2, b'.']).contains("underflow"));
        assert!(err(&[0x80, 2, b'(', b'K', 1, b'(', b'R']).contains("underflow"));
        assert!(err(&[0x80, 2, b'h', 7, b'.']).contains("memo entry 7"));
        assert!(err(&[0x80, 2, b'u']).contains("no MARK"));
        assert!(err(&[0x80, 2, b'K', 0, b'K', 1, b'K', 2, b's']).contains("needs a dict"));
        assert!(err(&[0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff]).contains("truncated"));
        assert!(err(&[0x80, 2, 0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).contains("bytes"));
        assert!(err(&[0x80, 2, b'c', b'o', b's']).contains("newline"));
        assert!(err(&[0x80, 2, 0x8a, 9]).contains("too large"));
        assert!(err(&[0x80, 2, b'X', 1, 0, 0, 0, 0xc3, b'.']).contains("UTF-8"));
    }

    #[test]
    fn stack_depth_is_bounded() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'N', MAX_STACK + 1));
        assert!(err(&p).contains("deeper than"));
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', MAX_STACK + 1));
        assert!(err(&p).contains("nested MARKs"));
        // Deep nesting through TUPLE1 is flat in the arena: parsing and dropping are fine.
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 1_000_000));
        p.push(b'.');
        assert!(parse(&p).is_ok());
        // A list containing itself.
        assert!(parse(&[0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.']).is_ok());
    }

    #[test]
    fn truncated_and_mutated_pickles_never_panic() {
        let good = tensor_dict(12, 2, &[2, 5], &[5, 1]);
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_err(), "prefix of {cut} bytes parsed");
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..1 + seed % 4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed >> 8) as usize % bytes.len();
                bytes[at] = (seed >> 40) as u8;
            }
            let _ = parse(&bytes);
        }
    }
}

//! The textual IR parser (the inverse of [`crate::print`]); see that module for the format.

use std::collections::{BTreeMap, HashMap};

use crate::{Attr, DType, Graph, Op, ParamRole, Tensor, TensorType, ValueId};

/// A syntax or reference error, with its 1-based line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Value(u32),
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let mut toks = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line) = (0, 1);
    let err = |line, msg: String| ParseError { line, msg };
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '%' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let digits: String = chars[start..i].iter().collect();
            let n = digits
                .parse()
                .map_err(|_| err(line, format!("bad value name `%{digits}`")))?;
            toks.push((Tok::Value(n), line));
        } else if c == '"' {
            i += 1;
            let mut s = String::new();
            loop {
                match chars.get(i) {
                    None | Some('\n') => return Err(err(line, "unterminated string".into())),
                    Some('"') => break,
                    Some('\\') => {
                        i += 1;
                        match chars.get(i) {
                            Some('"') => s.push('"'),
                            Some('\\') => s.push('\\'),
                            Some('n') => s.push('\n'),
                            other => {
                                return Err(err(
                                    line,
                                    format!("bad escape `\\{}`", other.copied().unwrap_or(' ')),
                                ))
                            }
                        }
                    }
                    Some(&ch) => s.push(ch),
                }
                i += 1;
            }
            i += 1;
            toks.push((Tok::Str(s), line));
        } else if c.is_ascii_digit() || c == '-' {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || ((chars[i] == '-' || chars[i] == '+') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            toks.push((Tok::Num(chars[start..i].iter().collect()), line));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            toks.push((Tok::Ident(chars[start..i].iter().collect()), line));
        } else if "=,:()[]{}@".contains(c) {
            toks.push((Tok::Punct(c), line));
            i += 1;
        } else {
            return Err(err(line, format!("unexpected character `{c}`")));
        }
    }
    Ok(toks)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    names: HashMap<u32, ValueId>,
    g: Graph,
}

/// Parses textual IR into a graph. Parameters get no data. The result is not verified; run
/// [`crate::verify`] on it.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
        names: HashMap::new(),
        g: Graph::new(),
    };
    p.expect_ident("graph")?;
    p.expect('{')?;
    loop {
        match p.peek() {
            Some(Tok::Punct('}')) => {
                p.pos += 1;
                break;
            }
            Some(Tok::Ident(k)) if k == "output" => {
                p.pos += 1;
                let name = p.string()?;
                p.expect('=')?;
                let v = p.use_value()?;
                p.g.add_output(name, v);
            }
            Some(Tok::Ident(k)) if k == "update" => {
                p.pos += 1;
                let target = p.use_value()?;
                p.expect('=')?;
                let v = p.use_value()?;
                p.g.add_update(target, v);
            }
            Some(Tok::Ident(k)) if k == "grad" => {
                p.pos += 1;
                let target = p.use_value()?;
                p.expect('=')?;
                let v = p.use_value()?;
                p.g.add_grad(target, v);
            }
            Some(Tok::Value(_)) => p.definition()?,
            _ => return Err(p.error("expected `%N = ...`, `output`, `update`, `grad` or `}`")),
        }
    }
    if p.pos != p.toks.len() {
        return Err(p.error("unexpected text after the graph"));
    }
    Ok(p.g)
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn line(&self) -> usize {
        self.toks
            .get(self.pos)
            .or(self.toks.last())
            .map_or(1, |(_, l)| *l)
    }

    fn error(&self, msg: &str) -> ParseError {
        let found = match self.peek() {
            None => "end of input".to_string(),
            Some(Tok::Value(n)) => format!("`%{n}`"),
            Some(Tok::Ident(s)) | Some(Tok::Num(s)) => format!("`{s}`"),
            Some(Tok::Str(s)) => format!("\"{s}\""),
            Some(Tok::Punct(c)) => format!("`{c}`"),
        };
        ParseError {
            line: self.line(),
            msg: format!("{msg}, found {found}"),
        }
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|(t, _)| t.clone());
        self.pos += 1;
        t
    }

    fn expect(&mut self, c: char) -> Result<(), ParseError> {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected `{c}`")))
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_ident(&mut self, s: &str) -> Result<(), ParseError> {
        match self.peek() {
            Some(Tok::Ident(k)) if k == s => {
                self.pos += 1;
                Ok(())
            }
            _ => Err(self.error(&format!("expected `{s}`"))),
        }
    }

    fn ident(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Ident(k)) => {
                let k = k.clone();
                self.pos += 1;
                Ok(k)
            }
            _ => Err(self.error("expected a name")),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Str(s)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => Err(self.error("expected a string")),
        }
    }

    fn int(&mut self) -> Result<i64, ParseError> {
        match self.peek() {
            Some(Tok::Num(s)) => {
                let v = s.parse().map_err(|_| self.error("expected an integer"))?;
                self.pos += 1;
                Ok(v)
            }
            _ => Err(self.error("expected an integer")),
        }
    }

    fn use_value(&mut self) -> Result<ValueId, ParseError> {
        match self.peek() {
            Some(Tok::Value(n)) => {
                let n = *n;
                let v = *self
                    .names
                    .get(&n)
                    .ok_or_else(|| self.error(&format!("`%{n}` is not defined")))?;
                self.pos += 1;
                Ok(v)
            }
            _ => Err(self.error("expected a value `%N`")),
        }
    }

    fn ty(&mut self) -> Result<TensorType, ParseError> {
        let d = self.ident()?;
        let dtype = DType::from_name(&d).ok_or_else(|| {
            self.pos -= 1;
            self.error("expected a dtype (f32, f16, bf16, i64, i32, bool)")
        })?;
        self.expect('[')?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                let d = self.int()?;
                shape.push(usize::try_from(d).map_err(|_| self.error("dims must be ≥ 0"))?);
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        let ty = TensorType::new(dtype, shape);
        if ty.checked_bytes().is_none() {
            return Err(ParseError {
                line: self.line(),
                msg: format!("type {ty} is too large"),
            });
        }
        Ok(ty)
    }

    fn define(&mut self, n: u32, v: ValueId, line: usize) -> Result<(), ParseError> {
        if self.names.insert(n, v).is_some() {
            return Err(ParseError {
                line,
                msg: format!("`%{n}` is defined twice"),
            });
        }
        Ok(())
    }

    fn definition(&mut self) -> Result<(), ParseError> {
        let line = self.line();
        let mut results = Vec::new();
        loop {
            match self.next() {
                Some(Tok::Value(n)) => results.push(n),
                _ => {
                    self.pos -= 1;
                    return Err(self.error("expected a value `%N`"));
                }
            }
            if !self.eat(',') {
                break;
            }
        }
        self.expect('=')?;
        let head = self.ident()?;
        let single = |_: &Parser| {
            if results.len() == 1 {
                Ok(results[0])
            } else {
                Err(ParseError {
                    line,
                    msg: format!("`{head}` defines exactly one value"),
                })
            }
        };
        match head.as_str() {
            "input" => {
                let n = single(self)?;
                let name = self.string()?;
                self.expect(':')?;
                let ty = self.ty()?;
                let v = self.g.add_input(name, ty);
                self.define(n, v, line)
            }
            "param" => {
                let n = single(self)?;
                let role = match self.peek() {
                    Some(Tok::Ident(k)) if k == "const" => ParamRole::Constant,
                    Some(Tok::Ident(k)) if k == "state" => ParamRole::OptimizerState,
                    _ => ParamRole::Weight,
                };
                if role != ParamRole::Weight {
                    self.pos += 1;
                }
                let name = self.string()?;
                self.expect(':')?;
                let ty = self.ty()?;
                let v = self.g.add_param(name, role, ty, None);
                self.define(n, v, line)
            }
            "const" => {
                let n = single(self)?;
                let (items, splat) = self.literal()?;
                self.expect(':')?;
                let ty = self.ty()?;
                let t = self.tensor(ty, items, splat, line)?;
                let v = self.g.add_const(t);
                self.define(n, v, line)
            }
            op_name => {
                let op_name = op_name.to_string();
                self.expect('(')?;
                let mut operands = Vec::new();
                if !self.eat(')') {
                    loop {
                        operands.push(self.use_value()?);
                        if self.eat(')') {
                            break;
                        }
                        self.expect(',')?;
                    }
                }
                let mut attrs = BTreeMap::new();
                if self.eat('{') {
                    loop {
                        let k = self.ident()?;
                        self.expect('=')?;
                        let a = self.attr()?;
                        if attrs.insert(k.clone(), a).is_some() {
                            return Err(ParseError {
                                line,
                                msg: format!("attribute `{k}` is given twice"),
                            });
                        }
                        if self.eat('}') {
                            break;
                        }
                        self.expect(',')?;
                    }
                }
                let op =
                    Op::from_parts(&op_name, &attrs).map_err(|msg| ParseError { line, msg })?;
                self.expect(':')?;
                let mut tys = vec![self.ty()?];
                while self.eat(',') {
                    tys.push(self.ty()?);
                }
                if tys.len() != results.len() {
                    return Err(ParseError {
                        line,
                        msg: format!("{} result(s) but {} type(s)", results.len(), tys.len()),
                    });
                }
                let phase = if self.eat('@') {
                    let tag = self.ident()?;
                    crate::Phase::from_tag(&tag).ok_or_else(|| ParseError {
                        line,
                        msg: format!("unknown phase `@{tag}` (b, w, u, r)"),
                    })?
                } else {
                    crate::Phase::Forward
                };
                let outs = self.g.add_node_typed(op, &operands, tys, "");
                let node = self.g.producer(outs[0]).expect("just added");
                self.g.set_phase(node, phase);
                for (n, v) in results.into_iter().zip(outs) {
                    self.define(n, v, line)?;
                }
                Ok(())
            }
        }
    }

    fn attr(&mut self) -> Result<Attr, ParseError> {
        match self.next() {
            Some(Tok::Num(s)) => {
                if let Ok(i) = s.parse::<i64>() {
                    Ok(Attr::Int(i))
                } else {
                    s.parse::<f32>().map(Attr::Float).map_err(|_| {
                        self.pos -= 1;
                        self.error("expected a number")
                    })
                }
            }
            Some(Tok::Ident(k)) => match k.as_str() {
                "true" => Ok(Attr::Bool(true)),
                "false" => Ok(Attr::Bool(false)),
                "inf" | "NaN" => Ok(Attr::Float(k.parse().unwrap())),
                _ => DType::from_name(&k).map(Attr::DType).ok_or_else(|| {
                    self.pos -= 1;
                    self.error("expected an attribute value")
                }),
            },
            Some(Tok::Punct('[')) => {
                let mut v = Vec::new();
                if !self.eat(']') {
                    loop {
                        v.push(self.int()?);
                        if self.eat(']') {
                            break;
                        }
                        self.expect(',')?;
                    }
                }
                Ok(Attr::Ints(v))
            }
            _ => {
                self.pos -= 1;
                Err(self.error("expected an attribute value"))
            }
        }
    }

    /// `[a, b, ...]` or `splat(a)`: the scalar tokens as text, and whether it was a splat.
    fn literal(&mut self) -> Result<(Vec<String>, bool), ParseError> {
        let splat = matches!(self.peek(), Some(Tok::Ident(k)) if k == "splat");
        let (open, close) = if splat {
            self.pos += 1;
            ('(', ')')
        } else {
            ('[', ']')
        };
        self.expect(open)?;
        let mut items = Vec::new();
        if !self.eat(close) {
            loop {
                match self.next() {
                    Some(Tok::Num(s)) | Some(Tok::Ident(s)) => items.push(s),
                    _ => {
                        self.pos -= 1;
                        return Err(self.error("expected a number"));
                    }
                }
                if self.eat(close) {
                    break;
                }
                self.expect(',')?;
            }
        }
        if splat && items.len() != 1 {
            return Err(self.error("`splat` takes one value"));
        }
        Ok((items, splat))
    }

    fn tensor(
        &self,
        ty: TensorType,
        items: Vec<String>,
        splat: bool,
        line: usize,
    ) -> Result<Tensor, ParseError> {
        let n = ty.numel();
        let items = if splat {
            vec![items[0].clone(); n]
        } else {
            items
        };
        if items.len() != n {
            return Err(ParseError {
                line,
                msg: format!("{} values for a constant of type {ty}", items.len()),
            });
        }
        let bad = |s: &str| ParseError {
            line,
            msg: format!("`{s}` is not a {} value", ty.dtype),
        };
        if ty.dtype == DType::F64 {
            let v: Result<Vec<f64>, _> = items
                .iter()
                .map(|s| s.parse::<f64>().map_err(|_| bad(s)))
                .collect();
            Ok(Tensor::from_f64(ty.dtype, ty.shape, &v?))
        } else if ty.dtype.is_float() {
            let v: Result<Vec<f32>, _> = items
                .iter()
                .map(|s| s.parse::<f32>().map_err(|_| bad(s)))
                .collect();
            Ok(Tensor::from_f32(ty.dtype, ty.shape, &v?))
        } else if ty.dtype == DType::Bool {
            let v: Result<Vec<i64>, _> = items
                .iter()
                .map(|s| match s.as_str() {
                    "true" => Ok(1),
                    "false" => Ok(0),
                    _ => Err(bad(s)),
                })
                .collect();
            Ok(Tensor::from_i64(ty.dtype, ty.shape, &v?))
        } else {
            let v: Result<Vec<i64>, _> = items
                .iter()
                .map(|s| s.parse::<i64>().map_err(|_| bad(s)))
                .collect();
            Ok(Tensor::from_i64(ty.dtype, ty.shape, &v?))
        }
    }
}

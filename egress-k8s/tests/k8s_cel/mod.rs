//! CEL as the Kubernetes API server evaluates it, for offline admission
//! tests: the `cel` crate's standard environment plus the Kubernetes IP and
//! CIDR libraries that our rules use (`isIP`, `ip`, `<IP>.family`, `isCIDR`,
//! `cidr`, `<CIDR>.ip`, `<CIDR>.prefixLength`).
//!
//! The libraries follow the Kubernetes reference
//! (<https://kubernetes.io/docs/reference/using-api/cel/#kubernetes-ip-address-library>
//! and the CIDR library after it), whose parsing is Go's `net/netip` with
//! zones and IPv4-mapped IPv6 refused:
//! - an IPv4 address is four decimal octets of at most 255, without leading
//!   zeros (`010.0.0.1` is refused);
//! - an IPv6 address has no zone (`fe80::1%eth0`) and is not IPv4-mapped
//!   (`::ffff:1.2.3.4`);
//! - a CIDR is such an address, `/`, and a prefix length within the
//!   family's width written without leading zeros or sign. Host bits after
//!   the prefix are accepted by the API server's parser (`netip.ParsePrefix`)
//!   although the reference's prose calls `cidr('192.168.0.1/16')` an
//!   error; no test here depends on that case.
//!
//! JSON numbers become CEL `int` (or `double` when fractional), as the API
//! server converts them.

#![allow(dead_code)]

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use cel::{
    Context, ExecutionError, FunctionContext, Program, Value,
    extractors::This,
    objects::{Key, Opaque},
};

#[derive(Debug, PartialEq, Eq)]
struct Ip(IpAddr);

impl Opaque for Ip {
    fn runtime_type_name(&self) -> &str {
        "net.IP"
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Cidr(IpAddr, u8);

impl Opaque for Cidr {
    fn runtime_type_name(&self) -> &str {
        "net.CIDR"
    }
}

/// `netip.ParseAddr` less zones and IPv4-mapped IPv6. Rust's parser, like
/// Go's, refuses leading zeros in IPv4 octets and zones.
pub fn parse_ip(raw: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = raw
        .parse()
        .map_err(|_| format!("IP Address {raw:?} parse error during conversion from string"))?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!("IPv4-mapped IPv6 address {raw:?} is not allowed"));
    }
    Ok(addr)
}

/// `netip.ParsePrefix` less IPv4-mapped IPv6.
pub fn parse_cidr(raw: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("network address parse error during conversion from string: {raw:?}");
    let (addr, bits) = raw.split_once('/').ok_or_else(bad)?;
    if addr.contains('%') {
        return Err(bad());
    }
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let width = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let digits_only = !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = bits.len() > 1 && bits.starts_with('0');
    let bits: u8 = match bits.parse() {
        Ok(b) if digits_only && !leading_zero && b <= width => b,
        _ => return Err(bad()),
    };
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!("IPv4-mapped IPv6 address {raw:?} is not allowed"));
    }
    Ok((addr, bits))
}

fn string_arg(v: &Value, function: &str) -> Result<Arc<String>, ExecutionError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(ExecutionError::function_error(
            function,
            format!("no such overload for {other:?}"),
        )),
    }
}

fn is_ip(This(s): This<Arc<String>>) -> bool {
    parse_ip(&s).is_ok()
}

fn is_cidr(This(s): This<Arc<String>>) -> bool {
    parse_cidr(&s).is_ok()
}

/// `ip(<string>)` and `<CIDR>.ip()`.
fn ip(ftx: &FunctionContext, This(target): This<Value>) -> Result<Value, ExecutionError> {
    if let Value::Opaque(o) = &target
        && let Some(c) = o.downcast_ref::<Cidr>()
    {
        return Ok(Value::Opaque(Arc::new(Ip(c.0))));
    }
    let s = string_arg(&target, "ip")?;
    parse_ip(&s)
        .map(|a| Value::Opaque(Arc::new(Ip(a))))
        .map_err(|e| ftx.error(e))
}

fn cidr(ftx: &FunctionContext, This(target): This<Value>) -> Result<Value, ExecutionError> {
    let s = string_arg(&target, "cidr")?;
    parse_cidr(&s)
        .map(|(a, b)| Value::Opaque(Arc::new(Cidr(a, b))))
        .map_err(|e| ftx.error(e))
}

fn opaque<'a, T: 'static>(v: &'a Value, function: &str) -> Result<&'a T, ExecutionError> {
    match v {
        Value::Opaque(o) => o.downcast_ref::<T>().ok_or_else(|| {
            ExecutionError::function_error(function, format!("no such overload for {v:?}"))
        }),
        _ => Err(ExecutionError::function_error(
            function,
            format!("no such overload for {v:?}"),
        )),
    }
}

/// `<IP>.family()`: 4 or 6.
fn family(This(target): This<Value>) -> Result<i64, ExecutionError> {
    Ok(match opaque::<Ip>(&target, "family")?.0 {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    })
}

fn prefix_length(This(target): This<Value>) -> Result<i64, ExecutionError> {
    Ok(i64::from(opaque::<Cidr>(&target, "prefixLength")?.1))
}

/// A JSON document as the API server hands it to CEL.
pub fn to_cel(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(a) => Value::List(Arc::new(a.iter().map(to_cel).collect())),
        serde_json::Value::Object(o) => {
            let map: HashMap<Key, Value> = o
                .iter()
                .map(|(k, v)| (Key::from(k.clone()), to_cel(v)))
                .collect();
            Value::from(map)
        }
    }
}

/// Compiles `rule` and evaluates it with `vars` bound; a rule must yield a
/// bool. An evaluation error is an error, as it is for the API server (a
/// rule that errors denies).
pub fn eval(rule: &str, vars: &[(&str, &serde_json::Value)]) -> Result<bool, String> {
    let vars: Vec<(&str, Value)> = vars.iter().map(|(n, v)| (*n, to_cel(v))).collect();
    match eval_value(rule, &vars)? {
        Value::Bool(b) => Ok(b),
        other => Err(format!("{rule}: yields {other:?}, not a bool")),
    }
}

/// Evaluates `expr` to a value, with `vars` bound.
pub fn eval_value(expr: &str, vars: &[(&str, Value)]) -> Result<Value, String> {
    let program = Program::compile(expr).map_err(|e| format!("{expr}: does not compile: {e}"))?;
    let mut ctx = Context::default();
    for (name, value) in [
        ("isIP", is_ip as fn(This<Arc<String>>) -> bool),
        ("isCIDR", is_cidr),
    ] {
        ctx.add_function(name, value).unwrap();
    }
    ctx.add_function("ip", ip).unwrap();
    ctx.add_function("cidr", cidr).unwrap();
    ctx.add_function("family", family).unwrap();
    ctx.add_function("prefixLength", prefix_length).unwrap();
    for (name, value) in vars {
        ctx.add_variable_from_value(*name, value.clone());
    }
    program.execute(&ctx).map_err(|e| format!("{expr}: {e}"))
}

/// The examples of the Kubernetes reference hold in this harness.
pub fn check_library_against_the_reference() {
    let t = |rule: &str| eval(rule, &[]).unwrap_or_else(|e| panic!("{e}"));
    let errs = |rule: &str| assert!(eval(rule, &[]).is_err(), "{rule} must be an error");
    assert!(t("isIP('127.0.0.1')"));
    assert!(t("isIP('::1')"));
    assert!(!t("isIP('127.0.0.256')"));
    assert!(!t("isIP(':::1')"));
    assert!(!t("isIP('127.0.0.01')"), "leading zeros");
    assert!(!t("isIP('::ffff:1.2.3.4')"), "IPv4-mapped");
    assert!(!t("isIP('fe80::1%eth0')"), "zone");
    assert!(t("ip('127.0.0.1').family() == 4"));
    assert!(t("ip('::1').family() == 6"));
    errs("ip('127.0.0.256')");
    errs("ip(':::1')");
    assert!(t("isCIDR('192.168.0.0/16')"));
    assert!(t("isCIDR('::1/128')"));
    assert!(!t("isCIDR('192.168.0.0/33')"));
    assert!(!t("isCIDR('::1/129')"));
    assert!(!t("isCIDR('192.168.0.0')"), "no mask");
    assert!(!t("isCIDR('192.168.0.0/016')"), "leading zero in the mask");
    assert!(!t("isCIDR('::ffff:1.2.3.4/120')"), "IPv4-mapped");
    assert!(t("cidr('192.168.0.0/16').ip().family() == 4"));
    assert!(t("cidr('2001:db8::/32').ip().family() == 6"));
    assert!(t("cidr('192.168.0.0/16').prefixLength() == 16"));
    errs("cidr('192.168.0.0/33')");
}

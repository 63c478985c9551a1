//! Incremental `GROUP BY` with COUNT, COUNT(DISTINCT), SUM, AVG, MIN, MAX,
//! BOOL_AND/OR and statistics, correct under deletes.
//!
//! State per group lives in RocksDB at `state id · encoded group key`: the
//! number of input rows in the group and one accumulator per aggregate —
//! a count; a running exact sum (`i128` for integers and decimals, `f64`
//! for floats) with its count of non-NULL inputs; or, for MIN/MAX and
//! COUNT(DISTINCT), the
//! multiset of input values (value → count), so that deleting the current
//! minimum finds the next one. For every group a delta touches the operator
//! emits the group's old output row with weight −1 and its new one with +1
//! (nothing when they are equal). A global aggregate (no GROUP BY) always
//! has its one row, as in batch SQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Float64Type, Int64Type, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;
use foldhash::HashMap as FastMap;

use super::operator::{cast_to_types, evaluate_all, OpCtx, Operator};
use super::ChangeBatch;
use crate::catalog::types::SqlType;
use crate::error::{Error, Result};
use crate::state::encoding::{decode_value, encode_cell, encode_value, table_prefix};

/// An aggregate function the operator maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// `COUNT(x)` (`COUNT(*)` is `COUNT(1)`).
    Count,
    /// `COUNT(DISTINCT x)`: the size of the group's value multiset.
    CountDistinct,
    /// `SUM(x)`.
    Sum,
    /// `AVG(x)`.
    Avg,
    /// `MIN(x)`.
    Min,
    /// `MAX(x)`.
    Max,
    /// `BOOL_AND(x)`.
    BoolAnd,
    /// `BOOL_OR(x)`.
    BoolOr,
    /// A statistic kept as sufficient statistics (n, Σa, Σb, Σa², Σb², Σab).
    Stat(StatFn),
}

/// Statistical aggregates. Two-argument ones take (Y, X), as in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatFn {
    /// `VAR_POP(x)`
    VarPop,
    /// `VAR_SAMP(x)` / `VARIANCE(x)`
    VarSamp,
    /// `STDDEV_POP(x)`
    StddevPop,
    /// `STDDEV_SAMP(x)` / `STDDEV(x)`
    StddevSamp,
    /// `COVAR_POP(y, x)`
    CovarPop,
    /// `COVAR_SAMP(y, x)`
    CovarSamp,
    /// `CORR(y, x)`
    Corr,
    /// `REGR_SLOPE(y, x)`
    RegrSlope,
    /// `REGR_INTERCEPT(y, x)`
    RegrIntercept,
    /// `REGR_R2(y, x)`
    RegrR2,
    /// `REGR_COUNT(y, x)`
    RegrCount,
}

impl StatFn {
    /// The statistic a DataFusion aggregate function name denotes.
    pub fn from_name(name: &str) -> Option<StatFn> {
        Some(match name {
            "var_pop" | "var_population" => StatFn::VarPop,
            "var" | "var_samp" | "var_sample" | "variance" => StatFn::VarSamp,
            "stddev_pop" => StatFn::StddevPop,
            "stddev" | "stddev_samp" => StatFn::StddevSamp,
            "covar_pop" => StatFn::CovarPop,
            "covar" | "covar_samp" => StatFn::CovarSamp,
            "corr" => StatFn::Corr,
            "regr_slope" => StatFn::RegrSlope,
            "regr_intercept" => StatFn::RegrIntercept,
            "regr_r2" => StatFn::RegrR2,
            "regr_count" => StatFn::RegrCount,
            _ => return None,
        })
    }

    /// Whether it takes two arguments.
    pub fn binary(self) -> bool {
        !matches!(
            self,
            StatFn::VarPop | StatFn::VarSamp | StatFn::StddevPop | StatFn::StddevSamp
        )
    }
}

/// One aggregate: function, argument, result type.
#[derive(Debug, Clone)]
pub struct AggSpec {
    /// Which function.
    pub kind: AggKind,
    /// The argument expression, over the operator's input.
    pub arg: Arc<dyn PhysicalExpr>,
    /// The argument's type.
    pub arg_type: DataType,
    /// The second argument of a two-argument statistic (X), and its type.
    pub arg2: Option<(Arc<dyn PhysicalExpr>, DataType)>,
    /// The result type (DataFusion's).
    pub out_type: DataType,
}

/// The incremental aggregate operator.
#[derive(Debug)]
pub struct HashAggregate {
    state_id: u32,
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_types: Vec<SqlType>,
    aggs: Vec<AggSpec>,
    arg_sql_types: Vec<Option<SqlType>>,
    schema: SchemaRef,
    /// The input never deletes: MIN/MAX state keeps only the extreme (the
    /// stored form stays a one-value multiset, so it reads the same).
    insert_only: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Acc {
    Count(i64),
    /// (non-NULL inputs, exact integer/decimal sum, float sum)
    Sum(i64, i128, f64),
    /// encoded value → (value, count)
    Set(BTreeMap<Vec<u8>, (ScalarValue, i64)>),
    /// (true inputs, false inputs)
    Bools(i64, i64),
    /// n and [Σa, Σb, Σa², Σb², Σab], exact in `i128` for integer inputs,
    /// else in `f64`.
    Stats(i64, [i128; 5], [f64; 5]),
}

#[derive(Debug, Clone, PartialEq)]
struct GroupState {
    rows: i64,
    accs: Vec<Acc>,
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

impl HashAggregate {
    /// A GROUP BY over `group_exprs` computing `aggs`, producing `schema`
    /// (group columns, then aggregates), with state under `state_id`.
    pub fn new(
        state_id: u32,
        group_exprs: Vec<Arc<dyn PhysicalExpr>>,
        aggs: Vec<AggSpec>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let group_types = schema.fields()[..group_exprs.len()]
            .iter()
            .map(|f| SqlType::from_arrow(f.data_type()))
            .collect::<Result<Vec<_>>>()?;
        let arg_sql_types = aggs
            .iter()
            .map(|a| match a.kind {
                AggKind::Min | AggKind::Max | AggKind::CountDistinct => {
                    SqlType::from_arrow(&a.arg_type).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        for a in &aggs {
            let ok = match a.kind {
                AggKind::Count | AggKind::CountDistinct | AggKind::Min | AggKind::Max => true,
                AggKind::Sum | AggKind::Avg | AggKind::Stat(_) => {
                    a.arg_type.is_integer()
                        || is_float(&a.arg_type)
                        || matches!(a.arg_type, DataType::Decimal128(..))
                }
                AggKind::BoolAnd | AggKind::BoolOr => a.arg_type == DataType::Boolean,
            };
            if !ok {
                return Err(Error::unsupported(format!(
                    "{:?} of {} is not supported in a materialized view yet",
                    a.kind, a.arg_type
                )));
            }
        }
        Ok(HashAggregate {
            state_id,
            group_exprs,
            group_types,
            aggs,
            arg_sql_types,
            schema,
            insert_only: false,
        })
    }

    /// Marks the input insert-only (see the field).
    pub fn insert_only(mut self, insert_only: bool) -> Self {
        self.insert_only = insert_only;
        self
    }

    fn empty_state(&self) -> GroupState {
        GroupState {
            rows: 0,
            accs: self
                .aggs
                .iter()
                .map(|a| match a.kind {
                    AggKind::Count => Acc::Count(0),
                    AggKind::Sum | AggKind::Avg => Acc::Sum(0, 0, 0.0),
                    AggKind::Min | AggKind::Max | AggKind::CountDistinct => {
                        Acc::Set(BTreeMap::new())
                    }
                    AggKind::BoolAnd | AggKind::BoolOr => Acc::Bools(0, 0),
                    AggKind::Stat(_) => Acc::Stats(0, [0; 5], [0.0; 5]),
                })
                .collect(),
        }
    }

    fn key(&self, group: &[u8]) -> Vec<u8> {
        let mut k = table_prefix(self.state_id).to_vec();
        k.extend_from_slice(group);
        k
    }

    fn load(&self, ctx: &OpCtx<'_>, group: &[u8]) -> Result<Option<GroupState>> {
        let Some(v) = ctx.get(&self.key(group))? else {
            return Ok(None);
        };
        let mut buf = v.as_slice();
        let rows = get_i64(&mut buf)?;
        let mut accs = Vec::with_capacity(self.aggs.len());
        for (a, t) in self.aggs.iter().zip(&self.arg_sql_types) {
            accs.push(match a.kind {
                AggKind::Count => Acc::Count(get_i64(&mut buf)?),
                AggKind::Sum | AggKind::Avg => {
                    Acc::Sum(get_i64(&mut buf)?, get_i128(&mut buf)?, get_f64(&mut buf)?)
                }
                AggKind::BoolAnd | AggKind::BoolOr => {
                    Acc::Bools(get_i64(&mut buf)?, get_i64(&mut buf)?)
                }
                AggKind::Stat(_) => {
                    let n = get_i64(&mut buf)?;
                    let mut i = [0i128; 5];
                    for x in i.iter_mut() {
                        *x = get_i128(&mut buf)?;
                    }
                    let mut f = [0f64; 5];
                    for x in f.iter_mut() {
                        *x = get_f64(&mut buf)?;
                    }
                    Acc::Stats(n, i, f)
                }
                AggKind::Min | AggKind::Max | AggKind::CountDistinct => {
                    let t = t
                        .as_ref()
                        .ok_or_else(|| Error::Internal("min/max without type".into()))?;
                    let len = get_i64(&mut buf)?;
                    let mut set = BTreeMap::new();
                    for _ in 0..len {
                        let before = buf;
                        let v = decode_value(&mut buf, t)?;
                        let enc = before[..before.len() - buf.len()].to_vec();
                        set.insert(enc, (v, get_i64(&mut buf)?));
                    }
                    Acc::Set(set)
                }
            });
        }
        Ok(Some(GroupState { rows, accs }))
    }

    fn store(&self, ctx: &mut OpCtx<'_>, group: &[u8], s: &GroupState) -> Result<()> {
        let mut v = Vec::new();
        put_i64(&mut v, s.rows)?;
        for (acc, spec) in s.accs.iter().zip(&self.aggs) {
            // Insert-only MIN/MAX: only the extreme can ever be the answer.
            let pruned;
            let acc = match (acc, spec.kind) {
                (Acc::Set(set), AggKind::Min | AggKind::Max)
                    if self.insert_only && set.len() > 1 =>
                {
                    let extreme = if spec.kind == AggKind::Min {
                        set.iter().next()
                    } else {
                        set.iter().next_back()
                    };
                    pruned = Acc::Set(
                        extreme
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .into_iter()
                            .collect(),
                    );
                    &pruned
                }
                _ => acc,
            };
            match acc {
                Acc::Count(c) => put_i64(&mut v, *c)?,
                Acc::Sum(n, i, f) => {
                    put_i64(&mut v, *n)?;
                    put_i128(&mut v, *i)?;
                    put_f64(&mut v, *f)?;
                }
                Acc::Bools(t, f) => {
                    put_i64(&mut v, *t)?;
                    put_i64(&mut v, *f)?;
                }
                Acc::Stats(n, i, f) => {
                    put_i64(&mut v, *n)?;
                    for x in i {
                        put_i128(&mut v, *x)?;
                    }
                    for x in f {
                        put_f64(&mut v, *x)?;
                    }
                }
                Acc::Set(set) => {
                    put_i64(&mut v, set.len() as i64)?;
                    for (enc, (_, c)) in set {
                        v.extend_from_slice(enc);
                        put_i64(&mut v, *c)?;
                    }
                }
            }
        }
        ctx.put(self.key(group), v);
        Ok(())
    }

    /// The output row of a group (its key values, then the aggregates).
    fn output(&self, keys: &[ScalarValue], s: &GroupState) -> Result<Vec<ScalarValue>> {
        let mut row = keys.to_vec();
        for (a, acc) in self.aggs.iter().zip(&s.accs) {
            let v = match (a.kind, acc) {
                (AggKind::Count, Acc::Count(c)) => ScalarValue::Int64(Some(*c)),
                (AggKind::CountDistinct, Acc::Set(set)) => {
                    ScalarValue::Int64(Some(set.len() as i64))
                }
                (AggKind::Sum | AggKind::Avg, Acc::Sum(n, i, f)) => {
                    if *n == 0 {
                        ScalarValue::try_from(&a.out_type)?
                    } else {
                        sum_or_avg(a, *n, *i, *f)?
                    }
                }
                (AggKind::Min, Acc::Set(set)) => match set.values().next() {
                    Some((v, _)) => v.clone(),
                    None => ScalarValue::try_from(&a.out_type)?,
                },
                (AggKind::Max, Acc::Set(set)) => match set.values().next_back() {
                    Some((v, _)) => v.clone(),
                    None => ScalarValue::try_from(&a.out_type)?,
                },
                (AggKind::BoolAnd, Acc::Bools(t, f)) => {
                    ScalarValue::Boolean((t + f > 0).then_some(*f == 0))
                }
                (AggKind::BoolOr, Acc::Bools(t, f)) => {
                    ScalarValue::Boolean((t + f > 0).then_some(*t > 0))
                }
                (AggKind::Stat(StatFn::RegrCount), Acc::Stats(n, ..)) => {
                    ScalarValue::Int64(Some(*n))
                }
                (AggKind::Stat(fun), Acc::Stats(n, i, f)) => {
                    ScalarValue::Float64(statistic(fun, *n, self.exact_stats(a), i, f))
                }
                _ => return Err(Error::Internal("aggregate state does not match".into())),
            };
            let v = if v.data_type() == a.out_type {
                v
            } else {
                v.cast_to(&a.out_type)?
            };
            row.push(v);
        }
        Ok(row)
    }

    fn exact_stats(&self, a: &AggSpec) -> bool {
        a.arg_type.is_integer() && a.arg2.as_ref().is_none_or(|(_, t)| t.is_integer())
    }

    /// The argument arrays cast once per batch to what the accumulators
    /// read: `Int64`/`Float64` for sums of integers/floats, the stored type
    /// for value multisets (MIN, MAX, COUNT(DISTINCT)).
    fn cast_args(&self, args: Vec<ArrayRef>) -> Result<Vec<ArrayRef>> {
        args.into_iter()
            .zip(self.aggs.iter().zip(&self.arg_sql_types))
            .map(|(arr, (a, t))| {
                let target = match (a.kind, t) {
                    (AggKind::Sum | AggKind::Avg, _) if is_float(&a.arg_type) => {
                        Some(DataType::Float64)
                    }
                    (AggKind::Sum | AggKind::Avg, _)
                        if !matches!(a.arg_type, DataType::Decimal128(..)) =>
                    {
                        Some(DataType::Int64)
                    }
                    (_, Some(t)) => Some(t.arrow_type()),
                    _ => None,
                };
                match target {
                    Some(dt) if arr.data_type() != &dt && arr.data_type() != &DataType::Null => {
                        Ok(cast(&arr, &dt)?)
                    }
                    _ => Ok(arr),
                }
            })
            .collect()
    }

    /// Folds row `r` of the (cast) argument arrays into `s` with weight `w`.
    fn apply(
        &self,
        s: &mut GroupState,
        args: &[ArrayRef],
        args2: &[Option<ArrayRef>],
        r: usize,
        w: i64,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        s.rows += w;
        for (idx, (a, acc)) in self.aggs.iter().zip(&mut s.accs).enumerate() {
            let arr = args[idx].as_ref();
            if null_at(arr, r) || args2[idx].as_ref().is_some_and(|b| null_at(b.as_ref(), r)) {
                continue;
            }
            match acc {
                Acc::Count(c) => *c += w,
                Acc::Bools(t, f) => match ScalarValue::try_from_array(arr, r)? {
                    ScalarValue::Boolean(Some(true)) => *t += w,
                    _ => *f += w,
                },
                Acc::Stats(n, i, f) => {
                    *n += w;
                    let v = ScalarValue::try_from_array(arr, r)?;
                    let b = match &args2[idx] {
                        Some(b) => Some(ScalarValue::try_from_array(b.as_ref(), r)?),
                        None => None,
                    };
                    if self.exact_stats(a) {
                        let x = as_i128(&v)?;
                        let y = match &b {
                            Some(b) => as_i128(b)?,
                            None => 0,
                        };
                        let terms = [x, y, x * x, y * y, x * y];
                        for (acc, t) in i.iter_mut().zip(terms) {
                            *acc = t
                                .checked_mul(w as i128)
                                .and_then(|d| acc.checked_add(d))
                                .ok_or_else(|| {
                                    Error::data(
                                        crate::error::DataErrorKind::NumericOutOfRange,
                                        "statistic out of range",
                                    )
                                })?;
                        }
                    } else {
                        let x = as_f64(&v)?;
                        let y = match &b {
                            Some(b) => as_f64(b)?,
                            None => 0.0,
                        };
                        let terms = [x, y, x * x, y * y, x * y];
                        for (acc, t) in f.iter_mut().zip(terms) {
                            *acc += t * w as f64;
                        }
                    }
                }
                Acc::Sum(n, i, f) => {
                    *n += w;
                    match arr.data_type() {
                        DataType::Float64 => {
                            *f += arr.as_primitive::<Float64Type>().value(r) * w as f64;
                        }
                        DataType::Int64 | DataType::Decimal128(..) => {
                            let x: i128 = match arr.data_type() {
                                DataType::Int64 => arr.as_primitive::<Int64Type>().value(r) as i128,
                                _ => arr.as_primitive::<Decimal128Type>().value(r),
                            };
                            *i = x
                                .checked_mul(w as i128)
                                .and_then(|d| i.checked_add(d))
                                .ok_or_else(|| {
                                    Error::data(
                                        crate::error::DataErrorKind::NumericOutOfRange,
                                        "sum out of range",
                                    )
                                })?;
                        }
                        other => {
                            return Err(Error::Internal(format!(
                                "sum over {other} after the argument cast"
                            )))
                        }
                    }
                }
                Acc::Set(set) => {
                    let t = self.arg_sql_types[idx]
                        .as_ref()
                        .ok_or_else(|| Error::Internal("min/max without type".into()))?;
                    let enc = &mut *scratch;
                    enc.clear();
                    encode_cell(enc, t, arr, r)?;
                    // Insert-only MIN/MAX: a value beyond the current
                    // extreme can never become the answer (nothing is ever
                    // retracted), so skip the set, its allocation and the
                    // ScalarValue. Encoded values compare as the values do.
                    if self.insert_only && w > 0 {
                        let beaten = match a.kind {
                            AggKind::Max => set.keys().next_back().is_some_and(|m| m > enc),
                            AggKind::Min => set.keys().next().is_some_and(|m| m < enc),
                            _ => false,
                        };
                        if beaten {
                            continue;
                        }
                        // A new extreme: the old one can never come back.
                        if matches!(a.kind, AggKind::Min | AggKind::Max) && !set.contains_key(enc) {
                            set.clear();
                        }
                    }
                    let enc = enc.clone();
                    let count = match set.get_mut(&enc) {
                        Some(entry) => {
                            entry.1 += w;
                            entry.1
                        }
                        None => {
                            set.insert(enc.clone(), (ScalarValue::try_from_array(arr, r)?, w));
                            w
                        }
                    };
                    if count == 0 {
                        set.remove(&enc);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether row `r` of `arr` is NULL (a `Null`-typed array is all NULL).
fn null_at(arr: &dyn Array, r: usize) -> bool {
    arr.data_type() == &DataType::Null || arr.is_null(r)
}

fn as_i128(v: &ScalarValue) -> Result<i128> {
    match v.cast_to(&DataType::Int64)? {
        ScalarValue::Int64(Some(x)) => Ok(x as i128),
        _ => Err(Error::Internal("statistic input is not an integer".into())),
    }
}

fn as_f64(v: &ScalarValue) -> Result<f64> {
    match v.cast_to(&DataType::Float64)? {
        ScalarValue::Float64(Some(x)) => Ok(x),
        _ => Err(Error::Internal("statistic input is not a number".into())),
    }
}

/// A statistic from sufficient statistics (a = Y, b = X). The centered
/// sums n·Σa² − (Σa)² etc. are exact for integer inputs.
fn statistic(fun: StatFn, n: i64, exact: bool, i: &[i128; 5], f: &[f64; 5]) -> Option<f64> {
    if n <= 0 {
        return None;
    }
    let nf = n as f64;
    let centered = |sq: usize, x: usize, y: usize| -> f64 {
        if exact {
            let n = n as i128;
            n.checked_mul(i[sq])
                .and_then(|a| i[x].checked_mul(i[y]).and_then(|b| a.checked_sub(b)))
                .map(|v| v as f64)
                .unwrap_or_else(|| nf * i[sq] as f64 - i[x] as f64 * i[y] as f64)
        } else {
            nf * f[sq] - f[x] * f[y]
        }
    };
    let sum = |k: usize| if exact { i[k] as f64 } else { f[k] };
    let (maa, mbb, mab) = (centered(2, 0, 0), centered(3, 1, 1), centered(4, 0, 1));
    let samp = nf * (nf - 1.0);
    match fun {
        StatFn::VarPop => Some(maa.max(0.0) / (nf * nf)),
        StatFn::VarSamp => (n > 1).then(|| maa.max(0.0) / samp),
        StatFn::StddevPop => Some((maa.max(0.0) / (nf * nf)).sqrt()),
        StatFn::StddevSamp => (n > 1).then(|| (maa.max(0.0) / samp).sqrt()),
        StatFn::CovarPop => Some(mab / (nf * nf)),
        StatFn::CovarSamp => (n > 1).then(|| mab / samp),
        StatFn::Corr => (maa > 0.0 && mbb > 0.0).then(|| mab / (maa * mbb).sqrt()),
        StatFn::RegrSlope => (mbb != 0.0).then(|| mab / mbb),
        StatFn::RegrIntercept => (mbb != 0.0).then(|| (sum(0) - sum(1) * mab / mbb) / nf),
        StatFn::RegrR2 => (mbb != 0.0).then(|| {
            if maa == 0.0 {
                1.0
            } else {
                mab * mab / (maa * mbb)
            }
        }),
        StatFn::RegrCount => Some(nf),
    }
}

// Accumulator state is stored with the value encoding of `state::encoding`
// (int8, numeric(38,0) for i128, float8).
const I128: SqlType = SqlType::Numeric {
    precision: 38,
    scale: 0,
};

fn put_i64(buf: &mut Vec<u8>, v: i64) -> Result<()> {
    encode_value(buf, &SqlType::Int8, &ScalarValue::Int64(Some(v)))
}

fn put_i128(buf: &mut Vec<u8>, v: i128) -> Result<()> {
    encode_value(buf, &I128, &ScalarValue::Decimal128(Some(v), 38, 0))
}

fn put_f64(buf: &mut Vec<u8>, v: f64) -> Result<()> {
    encode_value(buf, &SqlType::Float8, &ScalarValue::Float64(Some(v)))
}

fn get_i64(buf: &mut &[u8]) -> Result<i64> {
    match decode_value(buf, &SqlType::Int8)? {
        ScalarValue::Int64(Some(i)) => Ok(i),
        _ => Err(Error::Storage("corrupt aggregate state".into())),
    }
}

fn get_i128(buf: &mut &[u8]) -> Result<i128> {
    match decode_value(buf, &I128)? {
        ScalarValue::Decimal128(Some(i), ..) => Ok(i),
        _ => Err(Error::Storage("corrupt aggregate state".into())),
    }
}

fn get_f64(buf: &mut &[u8]) -> Result<f64> {
    match decode_value(buf, &SqlType::Float8)? {
        ScalarValue::Float64(Some(f)) => Ok(f),
        _ => Err(Error::Storage("corrupt aggregate state".into())),
    }
}

fn sum_or_avg(a: &AggSpec, n: i64, i: i128, f: f64) -> Result<ScalarValue> {
    let float = is_float(&a.arg_type);
    Ok(match (a.kind, &a.out_type) {
        (AggKind::Sum, DataType::Float64 | DataType::Float32) => ScalarValue::Float64(Some(f)),
        (AggKind::Sum, DataType::Decimal128(p, s)) => ScalarValue::Decimal128(Some(i), *p, *s),
        (AggKind::Sum, _) => ScalarValue::Int64(Some(i64::try_from(i).map_err(|_| {
            Error::data(
                crate::error::DataErrorKind::NumericOutOfRange,
                "bigint out of range",
            )
        })?)),
        (AggKind::Avg, DataType::Decimal128(p, s)) => {
            let in_scale = match a.arg_type {
                DataType::Decimal128(_, s) => s,
                _ => 0,
            };
            let shift = 10i128.pow((*s - in_scale).max(0) as u32);
            let num = i * shift;
            let q = num / n as i128;
            let r = num % n as i128;
            // Round half away from zero.
            let q = if (r.abs() * 2) >= n as i128 {
                q + num.signum()
            } else {
                q
            };
            ScalarValue::Decimal128(Some(q), *p, *s)
        }
        (AggKind::Avg, _) => {
            let total = if float { f } else { i as f64 };
            ScalarValue::Float64(Some(total / n as f64))
        }
        _ => return Err(Error::Internal("not a sum".into())),
    })
}

impl Operator for HashAggregate {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn describe(&self) -> String {
        let groups: Vec<String> = self.group_exprs.iter().map(|e| e.to_string()).collect();
        let aggs: Vec<String> = self
            .aggs
            .iter()
            .map(|a| format!("{:?}({})", a.kind, a.arg))
            .collect();
        format!(
            "HashAggregate: state={} group=[{}] aggs=[{}]",
            self.state_id,
            groups.join(", "),
            aggs.join(", ")
        )
    }

    /// A global aggregate (no GROUP BY) has one row over the empty input.
    fn initial_output(&self) -> Result<Option<ChangeBatch>> {
        if !self.group_exprs.is_empty() {
            return Ok(None);
        }
        let row = self.output(&[], &self.empty_state())?;
        Ok(Some(ChangeBatch::from_rows(&self.schema, vec![(row, 1)])?))
    }

    fn process(&mut self, input: ChangeBatch, ctx: &mut OpCtx<'_>) -> Result<ChangeBatch> {
        let n = input.len();
        let groups = cast_to_types(
            evaluate_all(&self.group_exprs, &input.data)?,
            &self.group_types,
        )?;
        let args = self.cast_args(evaluate_all(self.aggs.iter().map(|a| &a.arg), &input.data)?)?;
        let args2 = self
            .aggs
            .iter()
            .map(|a| match &a.arg2 {
                Some((e, _)) => Ok(Some(evaluate_all([e], &input.data)?.remove(0))),
                None => Ok(None),
            })
            .collect::<Result<Vec<Option<ArrayRef>>>>()?;
        // Group the delta's rows by encoded group key, in first-seen order:
        // (key, key values, state before, state after).
        // The old output row is computed when the group is first touched,
        // so the stored state need not be cloned to remember it.
        type Touched = (
            Vec<u8>,
            Vec<ScalarValue>,
            Option<Vec<ScalarValue>>,
            GroupState,
        );
        let global = self.group_exprs.is_empty();
        let mut touched: Vec<Touched> = Vec::new();
        let mut index: FastMap<Vec<u8>, usize> = FastMap::default();
        let mut key = Vec::new();
        let mut scratch = Vec::new();
        for r in 0..n {
            key.clear();
            for (g, t) in groups.iter().zip(&self.group_types) {
                encode_cell(&mut key, t, g.as_ref(), r)?;
            }
            let i = match index.get(key.as_slice()) {
                Some(&i) => i,
                None => {
                    let old = self.load(ctx, &key)?;
                    let key_values = groups
                        .iter()
                        .map(|g| ScalarValue::try_from_array(g.as_ref(), r))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let old_row = match &old {
                        Some(s) if s.rows > 0 || global => Some(self.output(&key_values, s)?),
                        None if global => Some(self.output(&key_values, &self.empty_state())?),
                        _ => None,
                    };
                    let cur = old.unwrap_or_else(|| self.empty_state());
                    index.insert(key.clone(), touched.len());
                    touched.push((key.clone(), key_values, old_row, cur));
                    touched.len() - 1
                }
            };
            let w = input.weights.value(r);
            self.apply(&mut touched[i].3, &args, &args2, r, w, &mut scratch)?;
        }
        drop(index);
        let mut out = Vec::new();
        for (key, key_values, old_row, new) in touched {
            if new.rows < 0 {
                return Err(Error::Internal(
                    "a group would have a negative row count".into(),
                ));
            }
            let new_row = if new.rows > 0 || global {
                Some(self.output(&key_values, &new)?)
            } else {
                None
            };
            if new.rows == 0 {
                ctx.delete(self.key(&key));
            } else {
                self.store(ctx, &key, &new)?;
            }
            if old_row != new_row {
                if let Some(r) = old_row {
                    out.push((r, -1));
                }
                if let Some(r) = new_row {
                    out.push((r, 1));
                }
            }
        }
        ChangeBatch::from_rows(&self.schema, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::col;
    use rocksdb::WriteBatch;

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]))
    }

    fn agg(group: bool) -> HashAggregate {
        let s = input();
        let spec = |kind, out_type| AggSpec {
            kind,
            arg: col("n", &s).unwrap(),
            arg_type: DataType::Int64,
            arg2: None,
            out_type,
        };
        let mut fields = vec![];
        if group {
            fields.push(Field::new("g", DataType::Utf8, true));
        }
        fields.extend([
            Field::new("c", DataType::Int64, true),
            Field::new("s", DataType::Int64, true),
            Field::new("lo", DataType::Int64, true),
            Field::new("hi", DataType::Int64, true),
        ]);
        HashAggregate::new(
            7,
            if group {
                vec![col("g", &s).unwrap()]
            } else {
                vec![]
            },
            vec![
                spec(AggKind::Count, DataType::Int64),
                spec(AggKind::Sum, DataType::Int64),
                spec(AggKind::Min, DataType::Int64),
                spec(AggKind::Max, DataType::Int64),
            ],
            Arc::new(Schema::new(fields)),
        )
        .unwrap()
    }

    /// Runs each fixture through the operator, committing between steps,
    /// and returns the printed outputs.
    fn run(op: &mut HashAggregate, steps: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        steps
            .iter()
            .map(|text| {
                let mut batch = WriteBatch::default();
                let out = {
                    let mut ctx = OpCtx::new(&store, &mut batch);
                    let delta = ChangeBatch::from_pretty(input(), text).unwrap();
                    op.process(delta, &mut ctx).unwrap()
                };
                store.write(batch).unwrap();
                out.to_pretty().unwrap()
            })
            .collect()
    }

    #[test]
    fn group_by_retracts_and_finds_the_next_extreme() {
        let mut op = agg(true);
        let out = run(
            &mut op,
            &[
                "+1 | a | 5
                 +1 | a | 9
                 +1 | b | NULL",
                "-1 | a | 9",
                "-1 | a | 5
                 +1 | b | 2",
            ],
        );
        // COUNT(n) skips the NULL.
        assert_eq!(
            out[0],
            "+1 | a | 2 | 14 | 5 | 9\n+1 | b | 0 | NULL | NULL | NULL"
        );
        // Deleting the maximum finds the next one.
        assert_eq!(out[1], "+1 | a | 1 | 5 | 5 | 5\n-1 | a | 2 | 14 | 5 | 9");
        // The group disappears with its last row.
        assert_eq!(
            out[2],
            "+1 | b | 1 | 2 | 2 | 2\n-1 | a | 1 | 5 | 5 | 5\n-1 | b | 0 | NULL | NULL | NULL"
        );
    }

    #[test]
    fn insert_only_min_max_equal_the_general_operator() {
        // Seeded pseudo-random insert-only deltas (NULLs, ties, weight 2,
        // rising and falling values) through the insert-only operator and
        // the general one must print the same outputs, commit by commit.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let steps: Vec<String> = (0..30)
            .map(|_| {
                (0..1 + next(12))
                    .map(|_| {
                        let w = 1 + next(2);
                        let g = ["a", "b", "c"][next(3) as usize];
                        let n = match next(8) {
                            0 => "NULL".to_string(),
                            _ => (next(40) as i64 - 20).to_string(),
                        };
                        format!("+{w} | {g} | {n}")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
        let general = run(&mut agg(true), &steps);
        let pruned = run(&mut agg(true).insert_only(true), &steps);
        assert_eq!(general, pruned);
        assert!(general.iter().any(|o| o.contains("-1")), "no group changed");
    }

    #[test]
    fn global_aggregate_keeps_its_row_when_empty() {
        let mut op = agg(false);
        assert_eq!(
            op.initial_output().unwrap().unwrap().to_pretty().unwrap(),
            "+1 | 0 | NULL | NULL | NULL"
        );
        let out = run(&mut op, &["+1 | a | 3", "-1 | a | 3"]);
        assert_eq!(out[0], "+1 | 1 | 3 | 3 | 3\n-1 | 0 | NULL | NULL | NULL");
        assert_eq!(out[1], "+1 | 0 | NULL | NULL | NULL\n-1 | 1 | 3 | 3 | 3");
    }
}

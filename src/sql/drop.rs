//! `DROP TABLE | VIEW | MATERIALIZED VIEW [IF EXISTS] name [, …]
//! [CASCADE | RESTRICT]`, and the dependency walk `DROP SOURCE` shares.

use datafusion::sql::sqlparser::ast::{ObjectName, ObjectType};

use crate::catalog::Relation;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sql::{object_name, Outcome};

/// Drops tables or views. Without CASCADE, refuses when other views depend on
/// the object (SQLSTATE 2BP01); with it, drops the dependents too. All drops
/// of one statement are one atomic catalog change.
pub async fn execute(
    engine: &Engine,
    object_type: ObjectType,
    if_exists: bool,
    names: &[ObjectName],
    cascade: bool,
) -> Result<Outcome> {
    let tag = match object_type {
        ObjectType::Table => "DROP TABLE",
        ObjectType::View => "DROP VIEW",
        ObjectType::MaterializedView => "DROP MATERIALIZED VIEW",
        other => return Err(Error::unsupported(format!("DROP {other} is not supported"))),
    };
    let _writer = engine.writer().await;
    let mut to_drop: Vec<String> = Vec::new();
    for name in names {
        let name = object_name(name)?;
        let kind = match engine.catalog.get(&name) {
            None if if_exists => continue,
            None => return Err(Error::UndefinedTable(name)),
            Some(Relation::Table(_)) => ObjectType::Table,
            Some(Relation::View(_)) => ObjectType::View,
            Some(Relation::MaterializedView(_)) => ObjectType::MaterializedView,
            Some(Relation::Source(_)) => {
                return Err(Error::WrongObjectType(format!(
                    "\"{name}\" is a source; use DROP SOURCE"
                )))
            }
        };
        if kind != object_type {
            let what = match object_type {
                ObjectType::Table => "a table",
                ObjectType::View => "a view",
                _ => "a materialized view",
            };
            return Err(Error::WrongObjectType(format!("\"{name}\" is not {what}")));
        }
        collect(engine, &name, cascade, &mut to_drop)?;
    }
    drop_collected(engine, &to_drop)?;
    Ok(Outcome::Command { tag, rows: None })
}

/// Drops the relations [`collect`] gathered, in one atomic catalog change.
/// Callers hold the engine's writer lock, so no commit or epoch is in
/// flight: pipelines and sources stop before their state goes.
pub fn drop_collected(engine: &Engine, to_drop: &[String]) -> Result<()> {
    engine.drop_objects(to_drop)
}

/// Adds `name` and (with `cascade`) everything that depends on it to `out`;
/// without `cascade`, dependents are an error (SQLSTATE 2BP01).
pub fn collect(engine: &Engine, name: &str, cascade: bool, out: &mut Vec<String>) -> Result<()> {
    if out.iter().any(|n| n == name) {
        return Ok(());
    }
    let deps = engine.catalog.dependents(name);
    if !deps.is_empty() && !cascade {
        return Err(Error::DependentObjects(format!(
            "cannot drop {name} because other objects depend on it ({}); use DROP … CASCADE to drop the dependent objects too",
            deps.join(", ")
        )));
    }
    out.push(name.to_string());
    for d in deps {
        collect(engine, &d, cascade, out)?;
    }
    Ok(())
}

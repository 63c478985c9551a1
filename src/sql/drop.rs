//! `DROP TABLE | VIEW [IF EXISTS] name [, …] [CASCADE | RESTRICT]`.

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
        other => return Err(Error::unsupported(format!("DROP {other} is not supported"))),
    };
    let _writer = engine.writer().await;
    let mut to_drop: Vec<String> = Vec::new();
    for name in names {
        let name = object_name(name)?;
        match (engine.catalog.get(&name), object_type) {
            (None, _) if if_exists => continue,
            (None, ObjectType::Table) => return Err(Error::UndefinedTable(name)),
            (None, _) => {
                return Err(Error::UndefinedTable(name));
            }
            (Some(Relation::Table(_)), ObjectType::View) => {
                return Err(Error::WrongObjectType(format!("\"{name}\" is not a view")))
            }
            (Some(Relation::View(_)), ObjectType::Table) => {
                return Err(Error::WrongObjectType(format!("\"{name}\" is not a table")))
            }
            _ => {}
        }
        collect(engine, &name, cascade, &mut to_drop)?;
    }
    // Drop dependents first is not needed for correctness (one batch), but
    // keep a stable order for the catalog.
    engine.catalog.drop_relations(&to_drop)?;
    Ok(Outcome::Command { tag, rows: None })
}

fn collect(engine: &Engine, name: &str, cascade: bool, out: &mut Vec<String>) -> Result<()> {
    if out.iter().any(|n| n == name) {
        return Ok(());
    }
    let deps = engine.catalog.dependents(name);
    if !deps.is_empty() && !cascade {
        return Err(Error::DependentObjects(format!(
            "cannot drop {name} because other objects depend on it (view {}); use DROP … CASCADE to drop the dependent objects too",
            deps.join(", ")
        )));
    }
    out.push(name.to_string());
    for d in deps {
        collect(engine, &d, cascade, out)?;
    }
    Ok(())
}

//! The inventory: per-machine values keyed by MAC address, from `[host."MAC"]` tables in
//! the configuration file or in the file `inventory = "PATH"` names. Templates see a
//! host's table as `host`; rules match it with `host = true` or `host = "NAME"`.

use std::collections::HashMap;
use std::path::Path;

use super::rules::{read_bounded, ConfigError};
use dyntftp::mac::MacAddr;

/// The largest inventory file read.
pub const MAX_INVENTORY_BYTES: u64 = 16 << 20;

/// One machine: its table as written (`name` and any other keys).
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// The `name` key, when it is a string.
    pub name: Option<String>,
    /// Every key of the host's table.
    pub table: toml::Table,
}

/// Machines by MAC address.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    hosts: HashMap<MacAddr, Host>,
}

impl Inventory {
    /// Adds the `[host."MAC"]` tables of `tables` (read from `file`); a key that is not a
    /// MAC address, a host given twice, or a `name` that is not a string is an error.
    pub fn add_tables(&mut self, file: &Path, tables: toml::Table) -> Result<(), ConfigError> {
        for (key, value) in tables {
            let at = |why: String| ConfigError::new(file, format!("host {key:?}: {why}"));
            let mac = MacAddr::parse(&key).ok_or_else(|| {
                at("not a MAC address (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)".into())
            })?;
            let toml::Value::Table(table) = value else {
                return Err(at("expected a table".into()));
            };
            let name = match table.get("name") {
                None => None,
                Some(toml::Value::String(name)) => Some(name.clone()),
                Some(_) => return Err(at("name: expected a string".into())),
            };
            if self.hosts.contains_key(&mac) {
                return Err(at(format!("{mac} is already in the inventory")));
            }
            self.hosts.insert(mac, Host { name, table });
        }
        Ok(())
    }

    /// Reads `path`, a TOML file of `[host."MAC"]` tables (nothing else), of at most
    /// [`MAX_INVENTORY_BYTES`].
    pub fn add_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct InventoryFile {
            #[serde(default)]
            host: toml::Table,
        }
        let text = read_bounded(path, MAX_INVENTORY_BYTES)?;
        let parsed: InventoryFile =
            toml::from_str(&text).map_err(|e| ConfigError::new(path, e.to_string()))?;
        self.add_tables(path, parsed.host)
    }

    /// The machine with this MAC address.
    pub fn get(&self, mac: &MacAddr) -> Option<&Host> {
        self.hosts.get(mac)
    }

    /// Whether some machine has this `name`.
    pub fn has_name(&self, name: &str) -> bool {
        self.hosts.values().any(|h| h.name.as_deref() == Some(name))
    }

    /// The number of machines.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(text: &str) -> toml::Table {
        text.parse::<toml::Table>().unwrap()
    }

    #[test]
    fn hosts_are_keyed_by_mac_in_any_form() {
        let mut inventory = Inventory::default();
        inventory
            .add_tables(
                Path::new("f"),
                tables("[\"AA-BB-cc-dd-ee-01\"]\nname = \"node1\"\nrole = \"compute\"\n"),
            )
            .unwrap();
        let mac = MacAddr::parse("aa:bb:cc:dd:ee:01").unwrap();
        let host = inventory.get(&mac).unwrap();
        assert_eq!(host.name.as_deref(), Some("node1"));
        assert_eq!(host.table["role"].as_str(), Some("compute"));
        assert!(inventory.has_name("node1") && !inventory.has_name("node2"));
        assert_eq!(inventory.len(), 1);
    }

    #[test]
    fn bad_keys_and_duplicates_are_errors() {
        let mut inventory = Inventory::default();
        let err = inventory
            .add_tables(
                Path::new("f.toml"),
                tables("[\"not-a-mac\"]\nname = \"x\"\n"),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("f.toml: host \"not-a-mac\": not a MAC"),
            "{err}"
        );
        inventory
            .add_tables(Path::new("f.toml"), tables("[\"aa:bb:cc:dd:ee:01\"]\n"))
            .unwrap();
        let err = inventory
            .add_tables(Path::new("g.toml"), tables("[\"aa-bb-cc-dd-ee-01\"]\n"))
            .unwrap_err();
        assert!(
            err.to_string().contains("already in the inventory"),
            "{err}"
        );
        let err = inventory
            .add_tables(
                Path::new("f.toml"),
                tables("[\"aa:bb:cc:dd:ee:02\"]\nname = 3\n"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("name: expected a string"), "{err}");
    }
}

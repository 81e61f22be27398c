//! The built-in optimizers, each generated from a spec in `specs/`.

use crate::dynamic::DynOptimizer;

crate::optimizer! { file = "specs/adamw.agr" }
crate::optimizer! { file = "specs/adamw_agr.agr" }
crate::optimizer! { file = "specs/adamw_agr_m.agr" }
crate::optimizer! { file = "specs/adan.agr" }
crate::optimizer! { file = "specs/adan_agr.agr" }
crate::optimizer! { file = "specs/adam.agr" }
crate::optimizer! { file = "specs/rmsprop.agr" }
crate::optimizer! { file = "specs/sgdm.agr" }
crate::optimizer! { file = "specs/sgdm_agr.agr" }
crate::optimizer! { file = "specs/lion.agr" }
crate::optimizer! { file = "specs/lion_agr.agr" }
crate::optimizer! { file = "specs/acprop.agr" }
crate::optimizer! { file = "specs/lamb.agr" }
crate::optimizer! { file = "specs/adamw_gc.agr" }
crate::optimizer! { file = "specs/adopt.agr" }
crate::optimizer! { file = "specs/cadamw_agr.agr" }
crate::optimizer! { file = "specs/muon.agr" }
crate::optimizer! { file = "specs/muon_agr.agr" }
crate::optimizer! { file = "specs/adafactor.agr" }
crate::optimizer! { file = "specs/nadam.agr" }

/// A built-in optimizer: its name in golden files and on the command line,
/// its Rust type name, and its spec source.
pub struct Builtin {
    pub name: &'static str,
    pub type_name: &'static str,
    pub source: &'static str,
    make: fn() -> Box<dyn DynOptimizer>,
}

impl Builtin {
    /// A fresh instance with the spec's default hyperparameters.
    pub fn make(&self) -> Box<dyn DynOptimizer> {
        (self.make)()
    }
}

macro_rules! builtins {
    ($($name:literal => $ty:ident, $file:literal;)*) => {
        /// Every built-in optimizer.
        pub const BUILTINS: &[Builtin] = &[$(
            Builtin {
                name: $name,
                type_name: stringify!($ty),
                source: include_str!(concat!("../specs/", $file)),
                make: || Box::new($ty::with_config(Default::default()).expect("built-in defaults are in range")),
            },
        )*];
    };
}

builtins! {
    "adamw" => AdamW, "adamw.agr";
    "adamw_agr" => AdamWAgr, "adamw_agr.agr";
    "adamw_agr_m" => AdamWAgrM, "adamw_agr_m.agr";
    "adan" => Adan, "adan.agr";
    "adan_agr" => AdanAgr, "adan_agr.agr";
    "adam" => Adam, "adam.agr";
    "rmsprop" => RmsProp, "rmsprop.agr";
    "sgdm" => Sgdm, "sgdm.agr";
    "sgdm_agr" => SgdmAgr, "sgdm_agr.agr";
    "lion" => Lion, "lion.agr";
    "lion_agr" => LionAgr, "lion_agr.agr";
    "acprop" => AcProp, "acprop.agr";
    "lamb" => Lamb, "lamb.agr";
    "adamw_gc" => AdamWGc, "adamw_gc.agr";
    "adopt" => Adopt, "adopt.agr";
    "cadamw_agr" => CAdamWAgr, "cadamw_agr.agr";
    "muon" => Muon, "muon.agr";
    "muon_agr" => MuonAgr, "muon_agr.agr";
    "adafactor" => Adafactor, "adafactor.agr";
    "nadam" => NAdam, "nadam.agr";
}

/// Looks a built-in up by name; an unknown name is an error that lists them.
pub fn builtin_or_err(name: &str) -> Result<&'static Builtin, String> {
    builtin(name).ok_or_else(|| {
        format!(
            "unknown optimizer `{name}`; the built-ins are {}",
            BUILTINS
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Looks a built-in up by its name (`adamw_agr`) or type name (`AdamWAgr`).
pub fn builtin(name: &str) -> Option<&'static Builtin> {
    BUILTINS
        .iter()
        .find(|b| b.name == name || b.type_name == name)
}

//! The spec generator (also compiled into the build script).

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Names a spec may take that the printers (or the target languages) also
/// use; generated specs draw `let` and state names from here.
pub const HOSTILE_NAMES: &[&str] = &[
    "a",
    "s",
    "ts",
    "h",
    "c",
    "i",
    "j",
    "k",
    "r",
    "T",
    "P",
    "G",
    "out",
    "acc",
    "racc",
    "ids",
    "is_max",
    "is_global",
    "sm_rows",
    "row0",
    "p_out",
    "m_out",
    "m4",
    "e5",
    "s3",
    "ts7",
    "e12",
    "float",
    "double",
    "int",
    "auto",
    "NULL",
    "INFINITY",
    "NAN",
    "None",
    "Some",
    "Ok",
    "Err",
    "reduced",
    "global",
    "partials",
    "counters",
    "chunks",
    "tensors",
    "ntensors",
    "upto",
    "row_len",
    "agr_inv",
    "agr_inv_if",
    "lr_1",
    "x_v2",
    "state_m",
    "float4",
    "sqrtf",
    "powf",
    "fmaxf",
    "threadIdx",
    "AGR_BLOCK",
    "AgrTensor",
    "agr_ld",
    "agr_tensor_step",
    "value",
    "name",
    "HYPERS",
    "f32",
    "f64",
];

/// A value in the step being generated.
#[derive(Clone)]
struct Val {
    text: String,
    /// Reduction passes before it is known.
    phase: usize,
}

struct Gen<'a> {
    rng: &'a mut Rng,
    /// Per-element values in scope (p, g, states, lets).
    elems: Vec<Val>,
    /// Scalar values in scope.
    scalars: Vec<Val>,
    bools: Vec<String>,
    /// Integer hyperparameters (repeat counts).
    ints: Vec<String>,
    names: Vec<String>,
    /// Whether the spec may reduce over one of the last two dimensions and
    /// declare reduced states (such a spec runs on the CPU only).
    dims: bool,
}

impl Gen<'_> {
    fn fresh(&mut self, base: &str) -> String {
        let mut n = if self.rng.chance(60) {
            self.rng.pick(HOSTILE_NAMES).to_string()
        } else {
            base.to_string()
        };
        let mut k = 2;
        let stem = n.clone();
        while self.names.contains(&n) {
            n = format!("{stem}{k}");
            k += 1;
        }
        self.names.push(n.clone());
        n
    }

    fn constant(&mut self) -> String {
        self.rng
            .pick(&[
                "0.5",
                "2",
                "1e-3",
                "0.9",
                "3",
                "0.25",
                "1.5",
                "(1 - 0.9)",
                "(2 * 0.5)",
            ])
            .to_string()
    }

    /// A scalar condition (per step or per tensor), sometimes constant.
    fn scalar_cond(&mut self) -> String {
        let mut opts = vec![
            "t > 1".to_string(),
            "t <= 2".to_string(),
            "ndim >= 2".to_string(),
            "numel > 10".to_string(),
            "2 > 0".to_string(),
            "1 >= 2".to_string(),
            "!(3 == 3) || true".to_string(),
        ];
        opts.extend(self.bools.iter().cloned());
        opts.extend(self.bools.iter().map(|b| format!("!{b}")));
        let c = self.rng.pick(&opts).clone();
        if self.rng.chance(20) {
            let d = self.rng.pick(&opts).clone();
            format!("({c}) && ({d})")
        } else {
            c
        }
    }

    fn scalar(&mut self, depth: usize) -> Val {
        let pick = self.rng.below(if depth == 0 { 3 } else { 7 });
        match pick {
            0 => Val {
                text: self.constant(),
                phase: 0,
            },
            1 | 2 => self.rng.pick(&self.scalars.clone()).clone(),
            3 => {
                // A reduction over a per-element value.
                let x = self.elem(depth - 1, 1);
                let f = *self.rng.pick(&[
                    "sum",
                    "mean",
                    "norm",
                    "max_abs",
                    "global_norm",
                    "global_max_abs",
                    "global_sum",
                ]);
                let text = if f == "sum" || f == "global_sum" {
                    format!("{f}({}) / numel", x.text)
                } else {
                    format!("{f}({})", x.text)
                };
                Val {
                    text,
                    phase: x.phase + 1,
                }
            }
            4 => {
                let a = self.scalar(depth - 1);
                let b = self.scalar(depth - 1);
                let op = *self.rng.pick(&["+", "-", "*"]);
                Val {
                    text: format!("({} {op} {})", a.text, b.text),
                    phase: a.phase.max(b.phase),
                }
            }
            5 => {
                let h = self.rng.pick(&self.scalars.clone()).clone();
                Val {
                    text: format!("(1 - pow(clamp({}, 0, 0.99), t))", h.text),
                    phase: h.phase,
                }
            }
            _ => {
                let c = self.scalar_cond();
                let a = self.scalar(depth - 1);
                let b = self.scalar(depth - 1);
                Val {
                    text: format!("select({c}, {}, {})", a.text, b.text),
                    phase: a.phase.max(b.phase),
                }
            }
        }
    }

    /// One statement of a matrix block on the block's matrix `x` that
    /// keeps its shape (rows × cols), its values bounded.
    fn matrix_stmt(&mut self, x: &str, depth: usize) -> String {
        let a = *self.rng.pick(&["0.5", "1", "0.75"]);
        let b = *self.rng.pick(&["0.25", "-0.25", "0.125"]);
        let c = *self.rng.pick(&["0.125", "-0.0625"]);
        match self.rng.below(if depth == 0 { 4 } else { 7 }) {
            0 => format!("{x} = {a} * {x} + {b} * ({x} @ transpose({x})) @ {x};"),
            1 => format!("{x} = {a} * {x} - {b} * {x} @ (transpose({x}) @ {x});"),
            2 => {
                let t = self.fresh("ma");
                format!("let {t} = {x} @ transpose({x}); {x} = {a} * {x} + ({b} * {t} + {c} * {t} @ {t}) @ {x};")
            }
            3 => {
                let d = *self.rng.pick(&["2", "(1 + t)", "max(1, rows / cols)"]);
                format!("{x} = {x} / {d};")
            }
            4 => {
                let cond = self.scalar_cond();
                let then = self.matrix_stmt(x, depth - 1);
                format!("if {cond} {{ {then} }} else {{ {x} = transpose(transpose({x})) * {a}; }}")
            }
            5 => {
                let mut counts = vec!["0".to_string(), "1".to_string(), "2".to_string()];
                counts.extend(self.ints.iter().cloned());
                let k = self.rng.pick(&counts).clone();
                let body = self.matrix_stmt(x, depth - 1);
                format!("repeat {k} {{ {body} }}")
            }
            _ => {
                let body = self.matrix_stmt(x, depth - 1);
                format!("if rows > cols {{ {x} = transpose({x}); }} {body} if rows > cols {{ {x} = transpose({x}); }}")
            }
        }
    }

    /// A per-element value whose reductions need at most `max_phase` passes.
    fn elem(&mut self, depth: usize, max_phase: usize) -> Val {
        let atoms: Vec<Val> = self
            .elems
            .iter()
            .filter(|v| v.phase <= max_phase)
            .cloned()
            .collect();
        if depth == 0 || self.rng.chance(25) {
            return self.rng.pick(&atoms).clone();
        }
        let d = depth - 1;
        let join = |a: &Val, b: &Val, text: String| Val {
            text,
            phase: a.phase.max(b.phase),
        };
        match self.rng.below(17) {
            0..=2 => {
                let a = self.elem(d, max_phase);
                let b = self.elem(d, max_phase);
                let op = *self.rng.pick(&["+", "-", "*"]);
                join(&a, &b, format!("({} {op} {})", a.text, b.text))
            }
            3 | 4 => {
                let a = self.elem(d, max_phase);
                let s = self.scalar(1);
                if s.phase > max_phase {
                    return a;
                }
                let op = *self.rng.pick(&["*", "+", "-"]);
                join(&a, &s, format!("({} {op} {})", a.text, s.text))
            }
            5 => {
                let a = self.elem(d, max_phase);
                let b = self.elem(d, max_phase);
                join(&a, &b, format!("({} / (abs({}) + 1))", a.text, b.text))
            }
            6 => {
                let a = self.elem(d, max_phase);
                let f = *self.rng.pick(&[
                    "sqrt(abs({}))",
                    "ln(abs({}) + 1)",
                    "exp(-abs({}))",
                    "pow(abs({}) + 1, 0.5)",
                    "sign({})",
                    "clamp({}, -1, 1)",
                    "-{}",
                    "({} ^ 2)",
                    "abs({})",
                ]);
                Val {
                    text: f.replace("{}", &a.text),
                    ..a
                }
            }
            7 | 8 => {
                let a = self.elem(d, max_phase);
                let b = self.elem(d, max_phase);
                let f = *self.rng.pick(&["max", "min"]);
                join(&a, &b, format!("{f}({}, {})", a.text, b.text))
            }
            9 => {
                let a = self.elem(d, max_phase);
                let b = self.elem(d, max_phase);
                let c = self.elem(0, max_phase);
                let v = join(&a, &b, String::new());
                join(
                    &v,
                    &c,
                    format!("select({} > 0, {}, {})", c.text, a.text, b.text),
                )
            }
            10 | 11 => {
                let cond = self.scalar_cond();
                let a = self.elem(d, max_phase);
                let b = self.elem(d, max_phase);
                join(
                    &a,
                    &b,
                    format!("if {cond} {{ {} }} else {{ {} }}", a.text, b.text),
                )
            }
            12 | 13 if max_phase >= 1 => {
                let x = self.elem(d, max_phase - 1);
                let fs: &[&str] = if self.dims {
                    &[
                        "agr", "row_mean", "row_sum", "mean_l", "mean_s", "sum_l", "sum_s",
                    ]
                } else {
                    &["agr", "row_mean", "row_sum"]
                };
                let f = *self.rng.pick(fs);
                let text = match f {
                    "row_sum" => format!("(row_sum({}) * 0.1)", x.text),
                    "mean_l" => format!("mean({}, -1)", x.text),
                    "mean_s" => format!("mean({}, -2)", x.text),
                    "sum_l" => format!("(sum({}, -1) * 0.1)", x.text),
                    "sum_s" => format!("(sum({}, -2) * 0.1)", x.text),
                    _ => format!("{f}({})", x.text),
                };
                Val {
                    text,
                    phase: x.phase + 1,
                }
            }
            14 if max_phase >= 1 => {
                let x = self.elem(d, max_phase - 1);
                let a = self.elem(d, max_phase);
                join(
                    &a,
                    &Val {
                        phase: x.phase + 1,
                        ..x.clone()
                    },
                    format!("({} - mean({}))", a.text, x.text),
                )
            }
            _ => {
                let a = self.elem(d, max_phase);
                let c = self.constant();
                Val {
                    text: format!("({} * {c})", a.text),
                    ..a
                }
            }
        }
    }
}

/// A random valid spec named `name`.
pub fn spec(rng: &mut Rng, name: &str) -> String {
    let mut g = Gen {
        rng,
        elems: vec![
            Val {
                text: "g".into(),
                phase: 0,
            },
            Val {
                text: "p".into(),
                phase: 0,
            },
        ],
        scalars: vec![
            Val {
                text: "t".into(),
                phase: 0,
            },
            Val {
                text: "ndim".into(),
                phase: 0,
            },
        ],
        bools: vec![],
        ints: vec![],
        names: vec![],
        dims: false,
    };
    // About a third of the specs use what runs on the CPU only (matrix
    // blocks, reductions over one dimension, reduced and per-tensor
    // states), several of them together; the rest keep every CUDA check busy.
    let cpu_only = g.rng.chance(35);
    g.dims = cpu_only && g.rng.chance(60);
    let mut hypers = vec!["lr = 0.01 where lr > 0".to_string()];
    g.names.push("lr".into());
    g.scalars.push(Val {
        text: "lr".into(),
        phase: 0,
    });
    for _ in 0..g.rng.below(3) {
        match g.rng.below(3) {
            0 => {
                let n = g.fresh("beta");
                hypers.push(format!("{n} = 0.{} where 0 <= {n} < 1", 1 + g.rng.below(9)));
                g.scalars.push(Val { text: n, phase: 0 });
            }
            1 => {
                let n = g.fresh("flag");
                let v = if g.rng.chance(50) { "true" } else { "false" };
                hypers.push(format!("{n} = {v}"));
                g.bools.push(n);
            }
            _ => {
                let n = g.fresh("k");
                hypers.push(format!(
                    "{n}: int = {} where 0 <= {n} <= 10",
                    g.rng.below(5)
                ));
                g.ints.push(n.clone());
                g.scalars.push(Val { text: n, phase: 0 });
            }
        }
    }
    let mut states = vec![];
    // Reduced states: one value per row (-1) or per column (-2).
    let mut reduced: Vec<(String, &str)> = vec![];
    for _ in 0..if g.dims { 1 + g.rng.below(2) } else { 0 } {
        let n = g.fresh("v");
        let axis = *g.rng.pick(&["-1", "-2"]);
        let init = *g.rng.pick(&["0", "-1", "0.5"]);
        g.elems.push(Val {
            text: n.clone(),
            phase: 0,
        });
        states.push((format!("{n}: reduced({axis})"), init.to_string()));
        reduced.push((n, axis));
    }
    // A per-tensor state (one number per tensor), read as a scalar.
    let mut per_tensor = None;
    if cpu_only && g.rng.chance(45) {
        let n = g.fresh("c");
        let init = *g.rng.pick(&["1", "0", "0.5"]);
        g.scalars.push(Val {
            text: n.clone(),
            phase: 0,
        });
        states.push((format!("{n}: per_tensor"), init.to_string()));
        per_tensor = Some(n);
    }
    for _ in 0..g.rng.below(4) {
        let n = g.fresh("m");
        let init = g
            .rng
            .pick(&[
                "0",
                "-1",
                "0.5",
                "g * 0.5",
                "abs(g)",
                "p * 0",
                "inf * 0 + 1",
            ])
            .to_string();
        // `inf * 0` is NaN: a constant error; keep such specs rare but present.
        let init = if init.starts_with("inf") && !g.rng.chance(10) {
            "1".to_string()
        } else {
            init
        };
        g.elems.push(Val {
            text: n.clone(),
            phase: 0,
        });
        states.push((n, init));
    }
    let mut body = vec![];
    for _ in 0..1 + g.rng.below(5) {
        let v = g.elem(3, 2);
        let n = g.fresh("x");
        body.push(format!("let {n} = {};", v.text));
        g.elems.push(Val {
            text: n,
            phase: v.phase,
        });
        if g.rng.chance(20) {
            let s = g.scalar(2);
            let n = g.fresh("sc");
            body.push(format!("let {n} = {};", s.text));
            g.scalars.push(Val {
                text: n,
                phase: s.phase,
            });
        }
    }
    // A matrix block (in about a fifth of the specs): a per-element value, scaled to
    // a Frobenius norm of at most 1, through shape-keeping products. Its
    // result enters the update linearly: the reference evaluation's products
    // are in f64, the runtime's in f32, and a comparison or a sign of the
    // result could tip either way.
    let mut matrix = None;
    if cpu_only && g.rng.chance(55) {
        let v = g.elem(2, 1);
        let n = g.fresh("mx");
        let mut stmts = vec![];
        for _ in 0..1 + g.rng.below(3) {
            stmts.push(g.matrix_stmt(&n, 2));
        }
        body.push(format!(
            "matrix {n} = {v} / max(norm({v}), 1e-3) {{ {} }}",
            stmts.join(" "),
            v = v.text
        ));
        matrix = Some(n);
    }
    if let Some(n) = &per_tensor {
        let v = g.scalar(2);
        if g.rng.chance(30) {
            let c = g.scalar_cond();
            body.push(format!(
                "if {c} {{ {n} = 0.9 * {n} + 0.1 * clamp({}, -10, 10); }}",
                v.text
            ));
        } else {
            body.push(format!("{n} = 0.5 * {n} + clamp({}, -10, 10);", v.text));
        }
        for sc in g.scalars.iter_mut().filter(|sc| &sc.text == n) {
            sc.phase = sc.phase.max(v.phase);
        }
    }
    for (n, axis) in &reduced {
        // A value that is the same along the reduced dimension.
        let v = g.elem(2, 1);
        let m = format!("mean(clamp({}, -10, 10), {axis})", v.text);
        if g.rng.chance(30) {
            let c = g.scalar_cond();
            body.push(format!(
                "if {c} {{ {n} = 0.9 * {n} + 0.1 * {m}; }} else {{ {n} = {n} * 0.5; }}"
            ));
        } else {
            body.push(format!("{n} = lerp({n}, {m}, 0.25);"));
        }
        for e in g.elems.iter_mut().filter(|e| &e.text == n) {
            e.phase = e.phase.max(v.phase + 1);
        }
    }
    for (n, _) in states.iter().filter(|(n, _)| !n.contains(':')) {
        let v = g.elem(2, 2);
        if g.rng.chance(30) {
            let c = g.scalar_cond();
            body.push(format!(
                "if {c} {{ {n} = 0.9 * {n} + 0.1 * {}; }} else {{ {n} = {n} * 0.5; }}",
                v.text
            ));
        } else {
            body.push(format!(
                "{n} = 0.9 * {n} + 0.1 * clamp({}, -10, 10);",
                v.text
            ));
        }
        for e in g.elems.iter_mut().filter(|e| &e.text == n) {
            e.phase = e.phase.max(v.phase);
        }
    }
    let upd = g.elem(3, 2);
    match matrix {
        Some(m) => body.push(format!(
            "p = p - lr * clamp({}, -100, 100) - lr * 0.5 * {m};",
            upd.text
        )),
        None => body.push(format!("p = p - lr * clamp({}, -100, 100);", upd.text)),
    }
    let mut text = format!("{name} {{\n    hyper {{ {} }}\n", hypers.join(", "));
    if !states.is_empty() {
        let s: Vec<String> = states.iter().map(|(n, i)| format!("{n} = {i}")).collect();
        text += &format!("    state {{ {} }}\n", s.join(", "));
    }
    text += "    step {\n";
    for b in body {
        text += &format!("        {b}\n");
    }
    text += "    }\n}\n";
    text
}

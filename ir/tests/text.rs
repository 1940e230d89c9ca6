//! The text form round-trips, and the parser and verifier name what is wrong.

use kiln_ir::text::{parse, print};
use kiln_ir::verify;

const SMALL: &str = "graph tiny
weight @emb : q8_0[64, 32]
weight @norm : f32[32]
weight @wq : q4_1[32, 32]
weight @bias : f32[32]
%0 = input {name=tokens} : i32[tokens]
%1 = input {name=positions} : i32[tokens]
%2 = embed @emb, %0 : f32[tokens, 32]
%3 = rms_norm %2, @norm {eps=1e-5} : f32[tokens, 32]
%4 = matmul %3, @wq : f32[tokens, 32]
%5 = add %4, @bias : f32[tokens, 32]
%6 = reshape %5 : f32[tokens, 2, 16]
%7 = rope %6, %1 {base=10000.0, dims=16, freq_scale=1.0, style=neox} : f32[tokens, 2, 16]
%8 = attention %7, %7, %7, %1 {layer=0, scale=0.25, window=none} : f32[tokens, 2, 16]
%9 = reshape %8 : f32[tokens, 32]
%10 = matmul %9, @emb : f32[tokens, 64]
output logits = %10
";

#[test]
fn round_trips_exactly() {
    let graph = parse(SMALL).unwrap();
    verify(&graph).unwrap();
    assert_eq!(print(&graph), SMALL);
}

#[test]
fn parse_errors_name_the_line() {
    let cases = [
        (
            "graph g\n%0 = frobnicate : f32[1]\n",
            "line 2: unknown op `frobnicate`",
        ),
        (
            "graph g\n%0 = embed @w : f32[1]\n",
            "line 2: undeclared weight @w",
        ),
        (
            "graph g\n%0 = input {name=tokens} : q9_9[1]\n",
            "line 2: unknown dtype `q9_9`",
        ),
        (
            "graph g\nweight @w : f32[1]\n%0 = rms_norm @w, @w : f32[1]\n",
            "line 3: missing attribute `eps`",
        ),
        (
            "%0 = input {name=tokens} : i32[tokens]\n",
            "line 1: expected `graph NAME` first",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(parse(text).unwrap_err().to_string(), want);
    }
}

#[test]
fn verifier_names_node_and_invariant() {
    let bad_inner = SMALL.replace("weight @wq : q4_1[32, 32]", "weight @wq : q4_1[32, 48]");
    let err = verify(&parse(&bad_inner).unwrap()).unwrap_err();
    assert_eq!(err.node, "%4 = matmul %3, @wq : f32[tokens, 32]");
    assert!(err.message.contains("inner dims differ"), "{err}");

    let bad_type = SMALL.replace(
        "%5 = add %4, @bias : f32[tokens, 32]",
        "%5 = add %4, @bias : f32[tokens, 33]",
    );
    let err = verify(&parse(&bad_type).unwrap()).unwrap_err();
    assert!(
        err.to_string()
            .contains("declared type f32[tokens, 33] but the operands give f32[tokens, 32]"),
        "{err}"
    );

    let bad_kv = SMALL.replace("%8 = attention %7, %7, %7", "%8 = attention %7, %5, %7");
    let err = verify(&parse(&bad_kv).unwrap()).unwrap_err();
    assert_eq!(err.message, "k must have rank 3, got f32[tokens, 32]");

    let value_as_weight = SMALL.replace("%10 = matmul %9, @emb", "%10 = matmul %9, %9");
    let err = verify(&parse(&value_as_weight).unwrap()).unwrap_err();
    assert_eq!(err.message, "operand 1 must be a weight, is %9");

    let no_output = SMALL.replace("output logits = %10\n", "");
    assert_eq!(
        verify(&parse(&no_output).unwrap()).unwrap_err().message,
        "the graph has no outputs"
    );
}

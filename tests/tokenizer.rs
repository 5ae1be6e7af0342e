//! The GGUF-built byte-level BPE tokenizer: a tiny hand-made vocabulary (digit splitting,
//! merges, special tokens, metadata errors) and the real SmolLM2 tokenizer when
//! scripts/fetch-assets.sh has fetched it.

mod common;

use sparsegrad::io::gguf::GgufFile;
use sparsegrad::model::tokenizer::Tokenizer;
use sparsegrad::Error;

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn str_kv(k: &str, v: &str) -> Vec<u8> {
    [gstr(k), 8u32.to_le_bytes().to_vec(), gstr(v)].concat()
}

fn str_arr_kv(k: &str, v: &[&str]) -> Vec<u8> {
    let mut b =
        [gstr(k), 9u32.to_le_bytes().to_vec(), 8u32.to_le_bytes().to_vec(), (v.len() as u64).to_le_bytes().to_vec()]
            .concat();
    v.iter().for_each(|s| b.extend(gstr(s)));
    b
}

fn i32_arr_kv(k: &str, v: &[i32]) -> Vec<u8> {
    let mut b =
        [gstr(k), 9u32.to_le_bytes().to_vec(), 5u32.to_le_bytes().to_vec(), (v.len() as u64).to_le_bytes().to_vec()]
            .concat();
    v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
    b
}

fn u32_kv(k: &str, v: u32) -> Vec<u8> {
    [gstr(k), 4u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat()
}

/// A metadata-only GGUF file.
fn gguf(kvs: &[Vec<u8>]) -> GgufFile {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    kvs.iter().for_each(|kv| b.extend_from_slice(kv));
    GgufFile::from_bytes(b).unwrap()
}

/// Byte-level tokens: `Ġ` is the space byte. "12" and "Ġab" exist as merged tokens.
const TOKENS: &[&str] = &["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab", "1", "2", "12", "<", ">", "s"];
const TYPES: &[i32] = &[3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
const MERGES: &[&str] = &["a b", "Ġ ab", "1 2"];

fn tiny(pre: &str, merges: &[&str]) -> Vec<Vec<u8>> {
    vec![
        str_kv("tokenizer.ggml.model", "gpt2"),
        str_kv("tokenizer.ggml.pre", pre),
        str_arr_kv("tokenizer.ggml.tokens", TOKENS),
        i32_arr_kv("tokenizer.ggml.token_type", TYPES),
        str_arr_kv("tokenizer.ggml.merges", merges),
        u32_kv("tokenizer.ggml.bos_token_id", 0),
        u32_kv("tokenizer.ggml.eos_token_id", 1),
    ]
}

#[test]
fn tiny_vocabulary_digits_merges_and_specials() {
    let t = Tokenizer::from_gguf(&gguf(&tiny("smollm", MERGES))).unwrap();
    assert_eq!((t.bos(), t.eos(), t.vocab_size()), (Some(0), Some(1), TOKENS.len()));
    assert_eq!(t.encode("ab ab").unwrap(), [4, 6]);
    // smollm splits digits individually, although "12" is a token and "1 2" a merge.
    assert_eq!(t.encode("12").unwrap(), [7, 8]);
    // Special tokens in text are single ids; encode adds no BOS/EOS by itself.
    assert_eq!(t.encode("<s>ab</s>").unwrap(), [0, 4, 1]);
    assert_eq!(t.decode(&[0, 4, 6, 7, 8]).unwrap(), "<s>ab ab12");
    assert!(matches!(t.decode(&[99]), Err(Error::InvalidArgument { .. })));
    assert_eq!((t.token_to_id("Ġab"), t.id_to_token(9).as_deref()), (Some(6), Some("12")));
    // The plain GPT-2 pre-tokenizer keeps digit runs together.
    let t = Tokenizer::from_gguf(&gguf(&tiny("gpt-2", MERGES))).unwrap();
    assert_eq!(t.encode("12").unwrap(), [9]);
}

#[test]
fn tokenizer_metadata_errors_name_the_key() {
    let key_of = |kvs: Vec<Vec<u8>>| match Tokenizer::from_gguf(&gguf(&kvs)) {
        Err(Error::Metadata { key, .. }) => key,
        other => panic!("expected a Metadata error, got {other:?}"),
    };
    let mut kvs = tiny("smollm", MERGES);
    kvs[0] = str_kv("tokenizer.ggml.model", "llama");
    assert_eq!(key_of(kvs), "tokenizer.ggml.model");
    assert_eq!(key_of(tiny("qwen2", MERGES)), "tokenizer.ggml.pre");
    assert_eq!(key_of(tiny("smollm", &["a b c"])), "tokenizer.ggml.merges");
    assert_eq!(key_of(tiny("smollm", &["a zz"])), "tokenizer.ggml.merges", "merge of a token not in the vocabulary");
    let mut kvs = tiny("smollm", MERGES);
    kvs.remove(2);
    assert_eq!(key_of(kvs), "tokenizer.ggml.tokens");
    let mut kvs = tiny("smollm", MERGES);
    kvs[5] = u32_kv("tokenizer.ggml.bos_token_id", 500);
    assert_eq!(key_of(kvs), "tokenizer.ggml.bos_token_id");
    let mut kvs = tiny("smollm", MERGES);
    kvs[3] = i32_arr_kv("tokenizer.ggml.token_type", &[1, 1]);
    assert_eq!(key_of(kvs), "tokenizer.ggml.token_type");
}

fn real() -> Option<Tokenizer> {
    let p = common::assets::path(common::assets::SMOLLM_GGUF);
    common::assets::present(&[&p]).then(|| Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap())
}

#[test]
fn real_smollm2_tokenizer() {
    let Some(t) = real() else { return };
    assert_eq!((t.vocab_size(), t.bos(), t.eos()), (49152, Some(1), Some(2)));
    let text = "The capital of France is";
    let ids = t.encode(text).unwrap();
    // The vocabulary's own entries: The, Ġcapital, Ġof, ĠFrance, Ġis.
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    assert_eq!(t.decode(&ids).unwrap(), text);
    let paris = t.encode(" Paris").unwrap();
    assert_eq!(paris, [7042]);
    assert_eq!(t.id_to_token(paris[0]).as_deref(), Some("ĠParis"));
    // Digits are tokenised one by one.
    let year = t.encode("2024").unwrap();
    assert_eq!(year.len(), 4);
    assert_eq!(year.iter().map(|&i| t.id_to_token(i).unwrap()).collect::<String>(), "2024");
    assert_eq!(t.encode(" 1000000").unwrap().len(), 8, "a space, then seven digits");
    // Chat markup is special.
    assert_eq!(t.encode("<|im_start|>user").unwrap()[0], 1);
    // Arbitrary text round-trips byte for byte.
    for s in ["héllo wörld — ✓ 🚀", "  two  spaces\nand a newline\t", "", "can't won't I'm", "&amp; <html>"] {
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
    }
}

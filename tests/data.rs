//! The sentiment corpus as LM data: parsing (CRLF, tabs, BOM, non-UTF-8 bytes, entities),
//! directory loading, the seeded disjoint split, and batching with a padding mask; plus
//! the real VADER corpus and tokenizer when scripts/fetch-assets.sh has fetched them.

mod common;

use sparsegrad::io::gguf::GgufFile;
use sparsegrad::model::tokenizer::Tokenizer;
use sparsegrad::recipes::vader::{self as data, Batch, BatchSpec};
use sparsegrad::Error;
use std::collections::HashSet;
use std::path::PathBuf;

const SAMPLE: &[u8] = b"\xEF\xBB\xBF1_1\t-0.9\ttroubleshooting ad-2500\tand more.\r\n\
1_2\t2.5\tWe were 17 deep &amp; the love &amp;amp; was strong \xFF!\r\n\
\r\n\
   \r\n\
7\t0\t   \r\n\
3\t1e0\t  great player.  \r\n\
4\t-1.25\tlast line without newline";

#[test]
fn parses_crlf_tabs_bom_and_bad_bytes() {
    let s = data::parse_corpus(SAMPLE, None).unwrap();
    let texts: Vec<&str> = s.iter().map(|x| x.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "troubleshooting ad-2500 and more.",
            "We were 17 deep & the love & was strong \u{FFFD}!",
            "great player.",
            "last line without newline"
        ]
    );
    assert_eq!(s[0].id, "1_1", "the byte-order mark is not part of the first id");
    assert_eq!(s.iter().map(|x| x.score).collect::<Vec<_>>(), [-0.9, 2.5, 1.0, -1.25]);
}

#[test]
fn malformed_lines_are_errors_naming_the_line() {
    let err = data::parse_corpus(b"1\t0.5\tok\r\n2\tno tabs here\r\n", None).unwrap_err();
    assert!(matches!(&err, Error::Format { msg, .. } if msg.contains("line 2")), "{err}");
    let err = data::parse_corpus(b"1\tx\ttext\n", None).unwrap_err();
    assert!(err.to_string().contains("not a number"), "{err}");
    let err = data::parse_corpus(b"1\tNaN\ttext\n", None).unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    assert!(data::parse_corpus(b"", None).unwrap().is_empty());
}

#[test]
fn loads_only_sentence_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("b_GroundTruth.txt"), "1\t1\tsecond file\r\n").unwrap();
    std::fs::write(d.join("a_GroundTruth.txt"), "1\t1\tfirst\r\n2\t-1\tfile\r\n").unwrap();
    std::fs::write(d.join("a_anonDataRatings.txt"), "1\t1\t0.5\t[1, 2]\r\n").unwrap();
    assert_eq!(data::load_corpus(d).unwrap(), ["first", "file", "second file"]);
    let err = data::load_corpus(tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(matches!(data::load_corpus(d.join("absent")), Err(Error::Io { .. })));
}

#[test]
fn split_is_seeded_disjoint_and_deduplicated() {
    let mut sentences: Vec<String> = (0..1000).map(|i| format!("sentence {i}")).collect();
    sentences.extend(["sentence 5".to_string(), "sentence 5".to_string()]);
    let a = data::train_validation_split(&sentences, 0.1, 42).unwrap();
    assert_eq!(a, data::train_validation_split(&sentences, 0.1, 42).unwrap());
    assert_ne!(a, data::train_validation_split(&sentences, 0.1, 43).unwrap());
    assert_eq!((a.train.len(), a.validation.len()), (900, 100));
    let train: HashSet<_> = a.train.iter().collect();
    let val: HashSet<_> = a.validation.iter().collect();
    assert!(train.is_disjoint(&val));
    assert_eq!(train.len() + val.len(), 1000, "duplicates kept once");
    // Corpus order is kept within each part.
    let pos = |s: &String| s[9..].parse::<usize>().unwrap();
    assert!(a.train.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
    // Tiny and degenerate inputs.
    let two = vec!["x".to_string(), "y".to_string()];
    let s = data::train_validation_split(&two, 0.001, 0).unwrap();
    assert_eq!((s.train.len(), s.validation.len()), (1, 1));
    let s = data::train_validation_split(&two, 0.0, 0).unwrap();
    assert_eq!((s.train.len(), s.validation.len()), (2, 0));
    assert!(data::train_validation_split(&two, 1.0, 0).is_err());
    assert!(data::train_validation_split(&two[..1], 0.5, 0).is_err());
}

fn spec(batch: usize, seq_len: usize, eos: Option<u32>) -> BatchSpec {
    BatchSpec { batch, seq_len, bos: 1, eos, pad: 0 }
}

fn row(b: &Batch, r: usize) -> (&[u32], &[u32], &[f32]) {
    let s = r * b.seq_len..(r + 1) * b.seq_len;
    (&b.inputs[s.clone()], &b.targets[s.clone()], &b.mask[s])
}

#[test]
fn batches_mask_padding_and_truncate() {
    let seqs: [&[u32]; 3] = [&[10, 11, 12], &[20, 21, 22, 23, 24, 25, 26], &[]];
    let b = data::make_batch(&seqs, &spec(4, 5, Some(2))).unwrap();
    assert_eq!((b.batch, b.seq_len, b.inputs.len(), b.targets.len(), b.mask.len()), (4, 5, 20, 20, 20));
    // [BOS 10 11 12 EOS]: 4 (input, target) pairs, one padded position.
    assert_eq!(row(&b, 0), (&[1, 10, 11, 12, 0][..], &[10, 11, 12, 2, 0][..], &[1.0, 1.0, 1.0, 1.0, 0.0][..]));
    // Longer than seq_len + 1: truncated, EOS falls off, no padding.
    assert_eq!(row(&b, 1), (&[1, 20, 21, 22, 23][..], &[20, 21, 22, 23, 24][..], &[1.0; 5][..]));
    // An empty sentence still predicts EOS after BOS.
    assert_eq!(row(&b, 2), (&[1, 0, 0, 0, 0][..], &[2, 0, 0, 0, 0][..], &[1.0, 0.0, 0.0, 0.0, 0.0][..]));
    // The missing fourth row is all padding.
    assert_eq!(row(&b, 3), (&[0; 5][..], &[0; 5][..], &[0.0; 5][..]));
    assert_eq!(b.n_targets(), 4 + 5 + 1);
    // Without EOS.
    let b = data::make_batch(&seqs[..1], &spec(1, 8, None)).unwrap();
    assert_eq!(row(&b, 0).2, &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert!(data::make_batch(&seqs, &spec(2, 5, None)).is_err(), "more sequences than rows");
    assert!(data::make_batch(&seqs[..1], &spec(1, 0, None)).is_err());
    assert!(data::make_batch(&seqs[..1], &spec(0, 4, None)).is_err());
}

#[test]
fn epochs_cover_every_sequence_once_in_seeded_order() {
    let seqs: Vec<Vec<u32>> = (0..10u32).map(|i| vec![100 + i; (i % 4) as usize + 1]).collect();
    let firsts = |seed| -> Vec<u32> {
        let batches: Vec<Batch> = data::epoch(&seqs, &spec(4, 6, None), seed).unwrap().collect();
        assert_eq!(batches.len(), 3, "10 sequences in batches of 4: the last is padded");
        assert!(batches.iter().all(|b| b.inputs.len() == 24));
        batches.iter().flat_map(|b| (0..4).filter(|&r| row(b, r).2[0] == 1.0).map(move |r| row(b, r).1[0])).collect()
    };
    let a = firsts(5);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (100..110).collect::<Vec<_>>());
    assert_eq!(a, firsts(5));
    assert_ne!(a, firsts(6));
    assert!(data::epoch(&seqs, &spec(0, 6, None), 0).is_err());
}

// ---------------------------------------------------------------------------------------

fn assets() -> Option<PathBuf> {
    use common::assets::{path, present, SMOLLM_GGUF, VADER_DIR};
    present(&[&path(VADER_DIR), &path(SMOLLM_GGUF)]).then(|| path("assets"))
}

#[test]
fn real_corpus_tokenised_and_batched() {
    let Some(root) = assets() else { return };
    let corpus = data::load_corpus(root.join("vader")).unwrap();
    // Lines per file (the last line of each has no line ending): amazon 3708, movie
    // 10605, nyt 5190, tweets 4200.
    assert_eq!(corpus.len(), 23703);
    assert!(corpus.iter().all(|s| !s.is_empty() && !s.contains('\t') && !s.contains('\r')));
    assert!(!corpus.iter().any(|s| s.contains("&amp;")));
    let split = data::train_validation_split(&corpus, 0.05, 0).unwrap();
    let unique: HashSet<_> = corpus.iter().collect();
    assert_eq!(split.train.len() + split.validation.len(), unique.len());

    let tok = Tokenizer::from_gguf(&GgufFile::open(root.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap()).unwrap();
    let ids = data::tokenize_all(&tok, &split.validation).unwrap();
    assert_eq!(ids.len(), split.validation.len());
    for (s, t) in split.validation.iter().zip(&ids).take(200) {
        assert_eq!(&tok.decode(t).unwrap(), s);
    }
    let spec = BatchSpec { batch: 16, seq_len: 64, bos: tok.bos().unwrap(), eos: tok.eos(), pad: tok.eos().unwrap() };
    let batches: Vec<Batch> = data::epoch(&ids, &spec, 1).unwrap().collect();
    assert_eq!(batches.len(), ids.len().div_ceil(16));
    let real: usize = ids.iter().map(|t| (t.len() + 1).min(64)).sum();
    assert_eq!(batches.iter().map(Batch::n_targets).sum::<usize>(), real);
}

import numpy as np
import torch

from collab_ray.core.vocab import EOS, TokenMap, UnionVocab, detect_style, fuse_logprobs, greedy_split, normalize_token, to_union


def test_normalize_styles():
    assert normalize_token("Ġthe", "byte_bpe") == b" the"
    assert normalize_token("Ã©", "byte_bpe") == "é".encode()
    assert normalize_token("Ċ", "byte_bpe") == b"\n"
    assert normalize_token("→", "byte_bpe") is None  # not byte-level text: matched by name
    assert normalize_token("▁the", "sentencepiece") == b" the"
    assert normalize_token("<0x0A>", "sentencepiece") == b"\n"
    assert normalize_token("<0xC3>", "sentencepiece") == b"\xc3"
    assert detect_style(["Ġa", "Ġb", "c"]) == "byte_bpe"
    assert detect_style(["▁a", "b"]) == "sentencepiece"
    assert detect_style(["a", "b"]) == "plain"


def bpe_map():
    return TokenMap.build(["</s>", "<s>", "Ġthe", "the", "A", "Ã", "©"], eos_ids=[0], special_ids=[0, 1])


def sp_map():
    return TokenMap.build(["<eos>", "▁the", "<0x41>", "A", "<0xC3>", "<0xA9>", "x"], eos_ids=[0], special_ids=[0])


def test_union_keys_and_index():
    bpe, sp = bpe_map(), sp_map()
    assert bpe.keys[:4] == [EOS, "<s>", b" the", b"the"]
    assert sp.ids_of[b"A"] == [2, 3]  # byte-fallback and text token spell the same key
    union = UnionVocab.build([bpe, sp])
    assert union.keys[union.index[0][2]] == b" the" and union.index[0][2] == union.index[1][1]
    assert union.index[0][0] == union.index[1][0]  # end-of-sequence tokens share EOS
    assert union.size == len({k for m in (bpe, sp) for k in m.keys})


def test_to_union_takes_the_best_spelling_and_fuses_in_probability_space():
    sp = sp_map()
    union = UnionVocab.build([sp])
    lp = torch.log(torch.tensor([0.1, 0.2, 0.05, 0.4, 0.1, 0.1, 0.05]))
    row = to_union(lp, torch.from_numpy(union.index[0]), union.size)
    assert torch.isclose(row[union.index[0][3]], torch.log(torch.tensor(0.4)))
    rows = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]))
    fused = fuse_logprobs(rows, torch.tensor([0.75, 0.25]))
    assert torch.allclose(fused.exp(), torch.tensor([0.4, 0.4, 0.2]))


def test_greedy_split_spells_partial_utf8_with_byte_tokens():
    sp = sp_map()
    assert greedy_split(b"\xc3", sp) == [4]
    assert greedy_split("é".encode(), sp) == [4, 5]
    assert np.array_equal(greedy_split(b"Ax", sp), [2, 6])

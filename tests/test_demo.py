"""rlopt-demo prints the seed's worked examples as computed by the library."""

from rlopt.demo import main


def test_demo_prints_seed_examples(capsys):
    main()
    out = capsys.readouterr().out
    # GRPO token 4: the library's 6.3 next to the seed's erroneous 5.76, flagged
    token4 = next(line for line in out.splitlines() if "5.76" in line and "ERRATUM" in line)
    assert "6.300000" in token4
    assert "0.875000   seed: 0.8   ERRATUM" in out
    # GSPO: group ratio gap and gradient, seed 0.166 and 2.53
    assert "= 0.165963   seed: 0.166" in out
    assert "= 2.530296   seed: 2.53" in out
    assert "1.104090   seed: 1.104" in out
    assert "-0.000000" not in out

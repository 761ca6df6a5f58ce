"""The rule registry: a name is taken only by the class that writes it, a clash is an error unless
``override=True``, names are case-insensitive, a rule without a decay is refused with a message.

Every test here restores the registry it found (fixture ``registry``), so rules defined here do not
leak into other test files.
"""
import re
import textwrap

import pytest
import torch
from torch import nn

import hebbloss
from hebbloss import rules
from reference import layer_update

D = torch.float64


def _snapshot():
    return {n: type(rules.get(n)) for n in rules.available()}


@pytest.fixture(autouse=True)
def registry():
    """The registry as it was before the test, restored afterwards."""
    before = _snapshot()
    yield before
    for n in set(rules.available()) - set(before):
        rules.unregister(n)
    for cls in before.values():
        rules.register(cls, override=True)
    assert _snapshot() == before


def _linear_and_batch():
    torch.manual_seed(0)
    return nn.Linear(4, 3, dtype=D), torch.randn(5, 4, dtype=D)


def _update_by_attach(layer, x, rule, post=torch.tanh):
    """-grad of weight and bias after attach(rule) + one forward and loss().backward()."""
    with hebbloss.attach(layer, rule=rule, post=post) as plastic:
        layer(x)
        plastic.loss().backward()
    return -layer.weight.grad, -layer.bias.grad


def test_a_subclass_that_only_inherits_a_name_registers_nothing(registry):
    class MyOja(rules.Oja):
        def decay(self, post, output):
            return 2 * post * post

    assert _snapshot() == registry
    assert type(rules.get("oja")) is rules.Oja
    # "oja" still means Oja's rule: S_c = sum y^2, computed here plainly
    layer, x = _linear_and_batch()
    y = torch.tanh(layer(x)).detach()
    want = layer_update(layer, x, y, (y * y).sum(0))
    got = _update_by_attach(layer, x, "oja")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    # and the subclass is usable as an object
    assert isinstance(rules.get(MyOja()), MyOja)


def test_a_taken_name_is_refused_naming_both_classes_and_nothing_changes(registry):
    with pytest.raises(ValueError) as err:
        class Impostor(rules.Rule):
            name = "oja"

            def decay(self, post, output):
                return post

    msg = str(err.value)
    assert "'oja'" in msg and "hebbloss.rules.Oja" in msg and "Impostor" in msg
    assert "another name" in msg and "override=True" in msg
    assert _snapshot() == registry


def test_a_case_variant_of_a_taken_name_is_refused_too(registry):
    with pytest.raises(ValueError, match="'oja' is already taken"):
        class Shouting(rules.Rule):
            name = "OJA"

            def decay(self, post, output):
                return post

    assert _snapshot() == registry


def test_override_true_replaces_a_rule_everywhere(registry):
    class MyOja(rules.Oja, override=True):
        name = "oja"

        def decay(self, post, output):
            return post.abs()

        def coefficients(self, post, output, channel_dim):
            return rules.Rule.coefficients(self, post, output, channel_dim)

    assert type(rules.get("oja")) is MyOja
    layer, x = _linear_and_batch()
    y = torch.tanh(layer(x)).detach()
    want = layer_update(layer, x, y, y.abs().sum(0))
    got = _update_by_attach(layer, x, "oja")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_override_without_a_name_of_its_own_is_refused(registry):
    with pytest.raises(TypeError, match="MyOja was given override=True but defines no name of its own"):
        class MyOja(rules.Oja, override=True):
            pass

    assert _snapshot() == registry


def test_names_are_case_insensitive_in_available_and_get(registry):
    class Capital(rules.Rule):
        name = "MyInstar"

        def decay(self, post, output):
            return post

    assert "myinstar" in rules.available() and "MyInstar" not in rules.available()
    for spelling in ("MyInstar", "myinstar", "MYINSTAR"):
        assert type(rules.get(spelling)) is Capital
    assert set(rules.available()) - set(registry) == {"myinstar"}


@pytest.mark.parametrize("bad", ["two words", "", "3rd", "a/b", 7])
def test_a_name_that_is_not_an_identifier_is_refused_and_nothing_changes(registry, bad):
    namespace = {"name": bad, "decay": lambda self, post, output: post}
    if bad == "":  # an empty name means "not registered"
        type("Unnamed", (rules.Rule,), namespace)
    else:
        with pytest.raises(ValueError, match=re.escape(f"has name {bad!r}; a rule name is a letter")):
            type("Odd", (rules.Rule,), namespace)
    assert _snapshot() == registry


def test_a_named_rule_without_decay_is_refused_at_its_definition(registry):
    with pytest.raises(TypeError) as err:
        class Lazy(rules.Rule):
            name = "lazy"

    msg = str(err.value)
    assert "Lazy defines neither decay nor coefficients" in msg
    assert "decay(self, post, output)" in msg and "coefficients(self, post, output, channel_dim)" in msg
    assert _snapshot() == registry


def test_an_unnamed_rule_without_decay_is_refused_before_attach_changes_anything():
    class Lazy(rules.Rule):
        pass

    layer, x = _linear_and_batch()
    for given in (Lazy, Lazy()):
        with pytest.raises(TypeError, match="Lazy defines neither decay nor coefficients"):
            hebbloss.attach(layer, rule=given)
        with pytest.raises(TypeError, match="Lazy defines neither decay nor coefficients"):
            hebbloss.surrogate_loss(layer, layer(x), torch.tanh(layer(x)), rule=given)
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    with pytest.raises(NotImplementedError, match="Lazy defines neither decay nor coefficients: implement decay"):
        Lazy().decay(x, x)


def test_a_rule_with_coefficients_only_is_accepted(registry):
    class Counted(rules.Rule):
        name = "counted"

        def coefficients(self, post, output, channel_dim):
            return torch.full((post.shape[channel_dim],), float(post.shape[0]), dtype=post.dtype)

    layer, x = _linear_and_batch()
    y = torch.tanh(layer(x)).detach()
    want = layer_update(layer, x, y, torch.full((3,), 5.0, dtype=D))
    got = _update_by_attach(layer, x, "counted")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_defining_the_same_class_again_replaces_it(registry):
    """A re-run notebook cell or a reloaded module defines the class again under the same qualified name."""
    made = []
    for scale in (1.0, 3.0):
        class Rerun(rules.Rule):
            name = "rerun"

            def decay(self, post, output, scale=scale):
                return scale * post

        made.append(Rerun)
    assert made[0] is not made[1] and type(rules.get("rerun")) is made[1]


def test_register_and_unregister_by_hand(registry):
    class Mine(rules.Instar):
        pass

    with pytest.raises(ValueError, match=r"Mine defines no name of its own \(it inherits 'instar'\)"):
        rules.register(Mine)
    with pytest.raises(TypeError, match="subclass of hebbloss.rules.Rule"):
        rules.register(nn.Linear)
    assert rules.register(rules.Instar) is rules.Instar  # its own name again: nothing changes
    assert _snapshot() == registry

    assert rules.unregister("INSTAR") is rules.Instar
    assert "instar" not in rules.available()
    with pytest.raises(ValueError, match="unknown rule 'instar'"):
        rules.get("instar")
    with pytest.raises(KeyError, match="no rule is registered as 'instar'"):
        rules.unregister("instar")
    rules.register(rules.Instar)
    assert _snapshot() == registry


def test_the_module_docstring_example_works_by_its_name(registry):
    """The example in hebbloss.rules' docstring, run as written: S_c = sum |y|, used by its name."""
    doc = rules.__doc__
    code = textwrap.dedent(doc.split("::\n\n", 1)[1].split("\n\n", 1)[0])
    namespace = {"hebbloss": hebbloss}
    exec(compile(code, "rules-docstring", "exec"), namespace)
    (cls,) = [v for v in namespace.values() if isinstance(v, type) and issubclass(v, rules.Rule)]
    new = set(rules.available()) - set(registry)
    assert new == {cls.name} and type(rules.get(cls.name)) is cls
    assert f"rule={cls.name!r}" in doc.replace('"', "'")  # the prose after the example uses the same name
    layer, x = _linear_and_batch()
    y = torch.tanh(layer(x)).detach()
    want = layer_update(layer, x, y, y.abs().sum(0))
    got = _update_by_attach(layer, x, cls.name)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

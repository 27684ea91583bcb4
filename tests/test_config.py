"""One typed request (`qexport.config`): made and checked once, carried whole into the artifact."""
import json

import pytest

import qexport
from qadmm.errors import UserError
from qadmm.methods.gptq import Params as GPTQParams
from qexport.config import CONSTRUCTORS, Config, config


def test_a_config_is_the_request_the_keywords_make(digits, digits_mlp):
    req = qexport.GPTQ(bits=3, per_channel=True, damp=0.05, layer_bits={"body.5": 8})
    assert req.method == "gptq" and req.spec.bits == 3 and req.params == GPTQParams(damp=0.05)
    a = qexport.quantize(digits_mlp, digits, req)
    b = qexport.quantize(digits_mlp, digits, "gptq", 3, per_channel=True, params={"damp": 0.05}, layer_bits={"body.5": 8})
    assert a.meta["spec"] == b.meta["spec"] and a.meta["method"]["params"] == b.meta["method"]["params"]
    assert all((a.layers[n].q == b.layers[n].q).all() for n in a.layers)
    # the artifact's entries are the request's JSON: the same request again
    again = Config.from_json({"method": a.meta["method"]["name"], "spec": a.meta["spec"], "params": {"damp": 0.05}})
    assert again.to_json() == json.loads(json.dumps(req.to_json())) and a.meta["spec"] == req.spec.to_json()
    with pytest.raises(UserError, match="bits given beside a gptq config"):
        qexport.quantize(digits_mlp, digits, req, bits=2)


def test_a_bad_request_is_refused_when_it_is_made():
    with pytest.raises(UserError, match="unknown hyperparameter"):
        qexport.GPTQ(bits=4, dampp=0.1)
    with pytest.raises(UserError):
        qexport.STE(bits=9)
    with pytest.raises(UserError, match="unknown method"):
        config("gptqq", bits=4)
    with pytest.raises(UserError, match="unknown field"):
        Config.from_json({"method": "ptq", "spec": {"bits": 4, "colour": "red"}})
    assert set(CONSTRUCTORS.values()) == set(__import__("qadmm.methods", fromlist=["METHODS"]).METHODS)
    spec = qexport.PTQ(bits=4).spec
    with pytest.raises(Exception):
        spec.bits = 2  # frozen: a request does not change on its way

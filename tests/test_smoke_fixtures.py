from loraformat.adapter import open_adapter


def test_every_variant_opens(peft_adapters):
    for name, path in peft_adapters.items():
        adapter = open_adapter(path)
        assert adapter.source_format == "peft", name
        assert adapter.modules, name

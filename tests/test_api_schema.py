"""Property-based tests of the HTTP API from its own OpenAPI schema (schemathesis): whatever a client sends, the
service answers without a 5xx and as its schema says."""
import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from engine.api.app import create_app  # noqa: E402
from engine.api.service import Service  # noqa: E402


@pytest.fixture(scope="module")
def api(shop, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("schema") / "catalog"
    shutil.copytree(shop, catalog)
    service = Service(catalog, token="s3cret")
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    service.close()


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text)
    # An upload the schema allows (any bytes) need not be an image: a 400 for it is right, not a rejected valid
    # request, so that one check is left out.
    case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])

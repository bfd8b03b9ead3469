"""The rule engine: rule files compiled once, evaluated per phase (DESIGN.md §5).

Tier 2: pure decisions.  No trio, no sockets, no clock; the loader is the only
code that reads files.  Public API:

- :func:`load_rules` -> :class:`RuleSet` (or :class:`RuleErrors`, every problem
  with ``file:line``);
- :meth:`RuleSet.evaluate` -> :class:`Verdict` (a value, never an exception);
- :func:`default_context` and :data:`FIELDS`: the context schema;
- :data:`DEFAULT_REPLIES` / :func:`default_reply`: replies when a rule gives none;
- :func:`run_cases` -> :class:`CaseReport`: the ``mailmoat rules test`` logic.
"""

from ._cases import CaseReport as CaseReport
from ._cases import CaseResult as CaseResult
from ._cases import run_cases as run_cases
from ._engine import EvalCache as EvalCache
from ._engine import RuleSet as RuleSet
from ._fields import FIELDS as FIELDS
from ._fields import NAMESPACES as NAMESPACES
from ._fields import PHASES as PHASES
from ._fields import PROTOCOLS as PROTOCOLS
from ._fields import Field as Field
from ._fields import default_context as default_context
from ._functions import IPNetwork as IPNetwork
from ._functions import IpRanges as IpRanges
from ._functions import NamedList as NamedList
from ._functions import cidr as cidr
from ._functions import glob as glob
from ._functions import parse_ip as parse_ip
from ._functions import parse_network as parse_network
from ._holder import ReloadResult as ReloadResult
from ._holder import RuleHolder as RuleHolder
from ._holder import snapshot as snapshot
from ._loader import load_rules as load_rules
from ._loader import parse_duration as parse_duration
from ._model import DEFAULT_REPLIES as DEFAULT_REPLIES
from ._model import PASS as PASS
from ._model import CompiledRule as CompiledRule
from ._model import HitCounters as HitCounters
from ._model import Match as Match
from ._model import RuleErrors as RuleErrors
from ._model import Scoring as Scoring
from ._model import Verdict as Verdict
from ._model import default_reply as default_reply

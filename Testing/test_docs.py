"""The documentation stays true: every CLI flag is in the CLI page, every relative link resolves, the README stays
short and shows the set-up commands, and no page speaks of the project's own history. Model-free."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / 'documentation'
PAGES = ['slicer.md', 'cli.md', 'outputs.md', 'what_the_map_explains.md', 'trust.md', 'methods_and_defaults.md',
         'model_kinds.md', 'server.md', 'cohorts.md', 'speed.md', 'differences.md', 'development.md']
README_MAX_LINES = 250
# phrases that tell the project's history instead of what is true; matched as whole phrases in prose (code excluded)
HISTORY = [r'sessions?', r'since', r'first run of', r'as left', r'left it', r'after a second read', r'second read',
           r'(?:was|were) lent', r'now fixed', r'earlier version', r'old default', r'issue \d+', r"issue's author"]


def markdown_files():
    return [ROOT / 'README.md'] + sorted(DOCS.glob('*.md'))


def without_code_blocks(text: str) -> str:
    return re.sub(r'^(```|~~~).*?^\1[^\n]*$', '', text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text without code blocks and inline code (flags, URLs with `since=`, paths are not prose)."""
    return re.sub(r'`[^`\n]*`', '', without_code_blocks(text))


def help_text(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    out = subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', *args, '--help'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # a loaded 2-core machine
    assert out.returncode == 0, out.stderr
    return out.stdout


def option_flags(help_output: str) -> set:
    """The flags argparse lists in its options sections: each option line's invocation part (before the help)."""
    flags = set()
    for line in help_output.splitlines():
        m = re.match(r'^ {2,}(-\S.*?)(?: {2,}|$)', line)
        if m:
            flags.update(re.findall(r'(?<![\w-])(--?[A-Za-z][\w-]*)', m.group(1)))
    return flags


def mentioned(flag: str, text: str) -> bool:
    return re.search(r'(?<![\w-])' + re.escape(flag) + r'(?![\w-])', text) is not None


def test_pages_exist_and_start_with_what_the_reader_wants():
    for name in PAGES:
        page = DOCS / name
        assert page.is_file(), f'documentation/{name} missing'
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines and lines[0].startswith('# '), f'documentation/{name} does not start with a title'
        assert len(lines) > 1 and not lines[1].startswith('#'), \
            f'documentation/{name}: the title is not followed by what the reader wants to do'


def test_option_flags_parses_argparse_help():
    text = ('usage: x [-h]\n\noptions:\n  -h, --help            show this help\n'
            '  -i INPUT [INPUT ...], --input INPUT [INPUT ...]\n                        image file(s), see -o\n'
            '  --progress {bar,json,none}\n  -step_size STEP_SIZE  sliding window step (--not-a-flag here)\n')
    assert option_flags(text) == {'-h', '--help', '-i', '--input', '--progress', '-step_size'}
    assert mentioned('-d', '`-d`, `-c`') and not mentioned('-d', '`-device`') and not mentioned('-c', '-chk')


def test_every_cli_flag_is_in_the_cli_page():
    cli_page = (DOCS / 'cli.md').read_text()
    main_help = help_text()
    # the subcommands the main help names (`nnunetv2_cam evaluate ...`, `... report ...`, `(nnunetv2_cam serve)`)
    subcommands = set(re.findall(r'nnunetv2_cam\s+([a-z][a-z-]+)', main_help))
    assert {'evaluate', 'report', 'serve', 'check-env'} <= subcommands, main_help
    missing = []
    for sub in sorted(subcommands):
        if not mentioned(f'nnunetv2_cam {sub}', cli_page):
            missing.append(f'subcommand `nnunetv2_cam {sub}`')
    helps = {'nnunetv2_cam': main_help}
    for sub in sorted(subcommands - {'check-env'}):  # check-env takes no options: it prints the report
        helps[f'nnunetv2_cam {sub}'] = help_text(sub)
    for command, text in helps.items():
        flags = option_flags(text)
        assert {'-h', '--help'} <= flags, f'{command} --help not parsed: {text}'
        missing += [f'{command} {flag}' for flag in sorted(flags) if not mentioned(flag, cli_page)]
    assert not missing, 'not in documentation/cli.md: ' + ', '.join(missing)


def test_relative_links_and_images_resolve():
    broken = []
    for path in markdown_files():
        text = prose(path.read_text())
        targets = re.findall(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', text)
        targets += re.findall(r'<img[^>]*\ssrc="([^"]+)"', text)
        targets += re.findall(r'^\s*\[[^\]]+\]:\s*(\S+)', text, flags=re.M)
        for target in targets:
            if re.match(r'[a-z][a-z0-9+.-]*:', target, flags=re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition('#')
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f'{path.relative_to(ROOT)}: {target}')
            elif anchor and linked.suffix == '.md' and anchor not in anchors(linked):
                broken.append(f'{path.relative_to(ROOT)}: {target} (no such heading)')
    assert not broken, 'broken links: ' + ', '.join(broken)


def anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r'^#{1,6}\s+(.+?)\s*#*$', without_code_blocks(page.read_text()), flags=re.M)
    return {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}


def test_readme_is_short_and_shows_the_set_up_commands():
    readme = (ROOT / 'README.md').read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, f'README.md has {len(readme.splitlines())} lines'
    for command in ('make demo', 'make test'):  # .ci/run runs the README's test command
        assert command in readme
    for name in PAGES:
        assert f'documentation/{name}' in readme, f'README.md does not link documentation/{name}'


@pytest.mark.parametrize('text, found', [
    ('as the first session left it', True), ('none was lent since', True), ('After a second read', True),
    ('in the second Session all passed', True), ('the goals of issue 4', True),
    ('a token read at Connect, events taken up with `since` or `Last-Event-ID`', False),
    ('sessional sincere left-handed ideas; the issue is open; lent', False)])
def test_history_phrases_match_whole_phrases_in_prose(text, found):
    assert bool(history_phrases(text)) == found


def history_phrases(text: str) -> list:
    return re.findall(r'\b(?:' + '|'.join(HISTORY) + r')\b', prose(text), flags=re.I)


def test_no_history_in_readme_or_documentation():
    found = {str(p.relative_to(ROOT)): history_phrases(p.read_text()) for p in markdown_files()}
    assert not {k: v for k, v in found.items() if v}, f'history words: {found}'

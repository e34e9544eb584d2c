"""nginx's grammar as nginx reads it: tokens, blocks, includes, `nginx -T` dumps, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockherd.nginx_conf import Directive, NginxConfError, is_dump, parse_dump, parse_file, parse_text, walk


def flat(directives: list[Directive]) -> list[tuple[str, tuple[str, ...], str, int]]:
    return [(d.name, d.args, d.file, d.line) for d, _ in walk(directives)]


def test_words_blocks_and_the_line_each_directive_starts_on() -> None:
    text = "events {}\nhttp {\n    upstream app {\n        server unix:/run/a.sock max_fails=0;\n    }\n}\n"
    assert flat(parse_text(text, "n.conf")) == [
        ("events", (), "n.conf", 1),
        ("http", (), "n.conf", 2),
        ("upstream", ("app",), "n.conf", 3),
        ("server", ("unix:/run/a.sock", "max_fails=0"), "n.conf", 4),
    ]


def test_quotes_escapes_and_comments() -> None:
    text = r"""
a "two words" 'single # not a comment' x#y;   # a comment { ; }
b "say \"hi\"" 'it\'s' "tab\there" back\\slash "other \d kept";
c "" '';
d "multi
line" after;
e ${var}x a} \;semi;
"""
    found = {d.name: (d.args, d.line) for d in parse_text(text, "q.conf")}
    assert found["a"] == (("two words", "single # not a comment", "x#y"), 2)
    assert found["b"] == (('say "hi"', "it's", "tab\there", "back\\slash", "other \\d kept"), 3)
    assert found["c"] == (("", ""), 4)
    assert found["d"] == (("multi\nline", "after"), 5)
    assert found["e"] == (("${var}x", "a}", "\\;semi"), 7)  # kept in the word, and kept as written


def test_include_globs_relative_to_the_main_files_directory(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("# b\nupstream b { server unix:/b.sock; }\n")
    # an include inside an included file is relative to the main file's directory too, as nginx -c does
    (tmp_path / "conf.d" / "a.conf").write_text("upstream a {\n  server unix:/a.sock;\n}\ninclude params;\n")
    (tmp_path / "conf.d" / "params").write_text("wrong_params_read;\n")  # the including file's directory: not read
    (tmp_path / "conf.d" / "skip.txt").write_text("not parsed {")
    (tmp_path / "params").write_text("\n\nproxy_http_version 1.1;\n")
    (tmp_path / "nginx.conf").write_text(
        "http {\n    include conf.d/*.conf;\n    include params;\n    include none/*.conf;\n}\n"
    )
    directives, files = parse_file(tmp_path / "nginx.conf")
    a, b, params = (str(tmp_path / "conf.d" / "a.conf"), str(tmp_path / "conf.d" / "b.conf"), str(tmp_path / "params"))
    assert files == [str(tmp_path / "nginx.conf"), a, params, b]
    assert flat(directives)[1:] == [
        ("upstream", ("a",), a, 1),
        ("server", ("unix:/a.sock",), a, 2),
        ("proxy_http_version", ("1.1",), params, 3),
        ("upstream", ("b",), b, 2),
        ("server", ("unix:/b.sock",), b, 2),
        ("proxy_http_version", ("1.1",), params, 3),
    ]


LUA = r"""
http {
    server {
        location /t {
            content_by_lua_block {
                local t = {1,2}  -- a table: { } are Lua here; # is the length operator
                ngx.say(#t, 'a; b', "}", "say \"}\"", '\'{')
                local s = [[ } { ]] .. [==[ ]] } ]=] ]==]
                --[[ a long comment with } and ;
                     on two lines ]]
                --[=[ another ]] } ]=]
                if #t > 1 then ngx.say("}") end
            }
            set_by_lua_block $answer { return 32 + #({1}) }
        }
        location /after {  # <- after
            proxy_pass http://a;
        }
    }
}
"""


def test_lua_blocks_are_skipped_as_lua_and_what_follows_keeps_its_line() -> None:
    found = flat(parse_text(LUA, "lua.conf"))
    names = [(name, line) for name, _, _, line in found]
    after = next(n for n, text in enumerate(LUA.splitlines(), 1) if "<- after" in text)
    assert names == [
        ("http", 2),
        ("server", 3),
        ("location", 4),
        ("content_by_lua_block", 5),
        ("set_by_lua_block", 14),
        ("location", after),
        ("proxy_pass", after + 1),
    ]
    content = next(args for name, args, _, _ in found if name == "content_by_lua_block")
    assert content[0].strip().startswith("local t = {1,2}") and content[0].rstrip().endswith('ngx.say("}") end')
    assert next(args for name, args, _, _ in found if name == "set_by_lua_block") == ("$answer", " return 32 + #({1}) ")


@pytest.mark.parametrize("lua", ["{ ngx.say('x') ", "{ local s = [[ } ", "{ --[==[ } ]] } ", "{ x = '}"])
def test_an_unclosed_lua_block_names_its_line(lua: str) -> None:
    with pytest.raises(NginxConfError) as caught:
        parse_text(f"http {{\n  access_by_lua_block {lua}\n", "lua.conf", prefix="/nonexistent")
    assert (caught.value.line, caught.value.reason) == (
        2,
        "unexpected end of file: the Lua block opened here is not closed",
    )


def test_nginx_dash_t_dump_keeps_each_files_name_and_lines() -> None:
    dump = (
        "nginx: the configuration file /etc/nginx/nginx.conf syntax is ok\n"
        "# configuration file /etc/nginx/nginx.conf:\n"
        "user www-data;\n"
        "http {\n"
        "    include /etc/nginx/conf.d/*.conf;\n"
        "}\n"
        "\n"
        "# configuration file /etc/nginx/conf.d/app.conf:\n"
        "\n"
        "upstream app {\n"
        "    server unix:/run/app/app.0.sock;\n"
        "}\n"
        "\n"
    )
    assert is_dump(dump) and not is_dump("http {}\n")
    directives, files = parse_dump(dump)
    assert files == ["/etc/nginx/nginx.conf", "/etc/nginx/conf.d/app.conf"]
    assert flat(directives) == [
        ("user", ("www-data",), "/etc/nginx/nginx.conf", 1),
        ("http", (), "/etc/nginx/nginx.conf", 2),
        ("upstream", ("app",), "/etc/nginx/conf.d/app.conf", 2),
        ("server", ("unix:/run/app/app.0.sock",), "/etc/nginx/conf.d/app.conf", 3),
    ]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("http {\n  a b;\n}\n}\n", 4, 'unexpected "}": no block is open'),
        ("http {\n  a b\n}\n", 3, 'unexpected "}": "a" needs a ";" first'),
        ("http {\n  a b;\n", 1, 'unexpected end of file, expecting "}" for the block opened here'),
        ("a b", 1, 'unexpected end of file, expecting ";" after "a"'),
        ("a;\n;\n", 2, 'unexpected ";"'),
        ('a "open;\n\n', 1, "the string opened with"),
        ('a "x"y;\n', 1, 'unexpected "y" after a quoted string'),
        ("include a b;\n", 1, '"include" takes one file name, got 2'),
    ],
)
def test_malformed_config_names_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(NginxConfError) as caught:
        parse_text(text, "bad.conf", prefix="/nonexistent")
    assert (caught.value.file, caught.value.line) == ("bad.conf", line)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"bad.conf:{line}: ")


def test_a_missing_include_names_the_including_line(tmp_path: Path) -> None:
    (tmp_path / "nginx.conf").write_text("events {}\nhttp {\n  include missing.conf;\n}\n")
    with pytest.raises(NginxConfError, match=r"nginx\.conf:3: include \".*missing\.conf\": no such file"):
        parse_file(tmp_path / "nginx.conf")


def test_an_include_cycle_is_an_error_not_a_recursion(tmp_path: Path) -> None:
    (tmp_path / "nginx.conf").write_text("include nginx.conf;\n")
    with pytest.raises(NginxConfError, match="includes itself"):
        parse_file(tmp_path / "nginx.conf")
